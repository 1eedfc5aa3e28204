# expect: reject OutOfBounds
# unchecked: run Access
ldxdw %r3, [%r1+16]
stdw [%r3+4096], 0
mov %r0, 0
exit
