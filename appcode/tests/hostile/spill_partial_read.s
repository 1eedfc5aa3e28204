# expect: reject SpilledPointer
stxdw [%r10-8], %r1
ldxw %r0, [%r10-8]
exit
