# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r2, [%r1]
ldxb %r0, [%r2-1]
exit
