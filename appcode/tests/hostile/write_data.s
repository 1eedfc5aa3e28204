# expect: reject ReadOnly
ldxdw %r2, [%r1]
stb [%r2], 1
mov %r0, 0
exit
