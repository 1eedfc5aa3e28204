# expect: reject OutOfBounds
# unchecked: result 1084818905618843912
# checks p + 4 <= end, then reads 8 bytes
ldxdw %r2, [%r1]
ldxdw %r3, [%r1+8]
ldxh %r4, [%r2]
and %r4, 0xfff
add %r2, %r4
mov %r5, %r2
add %r5, 4
jgt %r5, %r3, out
ldxdw %r0, [%r2]
exit
out:
mov %r0, 0
exit
