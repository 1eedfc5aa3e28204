# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r2, [%r1]
ldxdw %r0, [%r2+4092]
exit
