# expect: run InsnLimit insns=10000
ldxdw %r2, [%r1+48]
stxdw [%r1+80], %r2
mov %r0, 0
exit
