# expect: reject Loop
# spins while the window's first byte is nonzero
ldxdw %r2, [%r1]
mov %r0, 0
l:
ldxb %r3, [%r2]
jne %r3, 0, l
exit
