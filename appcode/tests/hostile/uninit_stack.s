# expect: reject UninitStack
ldxdw %r0, [%r10-8]
exit
