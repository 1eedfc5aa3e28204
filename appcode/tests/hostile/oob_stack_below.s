# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r0, [%r10-520]
exit
