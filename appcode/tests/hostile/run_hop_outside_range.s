# expect: run OutOfRange
lddw %r2, 0x7fffffffffff
stxdw [%r1+80], %r2
mov %r0, 0
exit
