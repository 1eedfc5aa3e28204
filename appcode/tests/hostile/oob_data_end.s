# expect: reject OutOfBounds
ldxdw %r2, [%r1]
ldxb %r0, [%r2+4096]
exit
