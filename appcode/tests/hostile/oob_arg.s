# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r3, [%r1+24]
ldxb %r0, [%r3+1024]
exit
