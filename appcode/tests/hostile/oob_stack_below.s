# expect: reject OutOfBounds
ldxdw %r0, [%r10-520]
exit
