# expect: reject OutOfBounds
# unchecked: result 65536
# pointer arithmetic on the context with a number from the caller
ldxdw %r2, [%r1+32]
add %r1, %r2
ldxdw %r0, [%r1]
exit
