# expect: reject UninitStack
stw [%r10-8], 1
ldxdw %r0, [%r10-8]
exit
