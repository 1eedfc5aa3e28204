# expect: run OutputLimit output_bytes=65536
# emits its whole scratch area on every hop
ldxdw %r6, [%r1+48]
stxdw [%r1+80], %r6
ldxdw %r1, [%r1+16]
mov %r2, 4096
call 3
mov %r0, 0
exit
