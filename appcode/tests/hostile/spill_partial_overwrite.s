# expect: reject SpilledPointer
stxdw [%r10-8], %r1
stb [%r10-8], 0
mov %r0, 0
exit
