# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r0, [%r1+88]
exit
