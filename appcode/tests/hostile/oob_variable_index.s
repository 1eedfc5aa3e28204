# expect: reject OutOfBounds
# unchecked: result 8
# an index from the file, masked to 13 bits: up to 8191
ldxdw %r2, [%r1]
ldxh %r3, [%r2]
and %r3, 0x1fff
add %r2, %r3
ldxb %r0, [%r2]
exit
