# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r3, [%r1+16]
stw [%r3+4094], 0
mov %r0, 0
exit
