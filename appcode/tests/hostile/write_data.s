# expect: reject ReadOnly
# unchecked: run Access
ldxdw %r2, [%r1]
stb [%r2], 1
mov %r0, 0
exit
