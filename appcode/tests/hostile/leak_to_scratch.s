# expect: reject PointerLeak
ldxdw %r3, [%r1+16]
stxdw [%r3], %r1
mov %r0, 0
exit
