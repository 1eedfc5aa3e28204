# expect: reject OutOfBounds
ldxdw %r0, [%r1+88]
exit
