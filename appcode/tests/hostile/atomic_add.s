# expect: reject Unsupported
stdw [%r10-8], 0
mov %r1, 1
lock add [%r10-8], %r1
mov %r0, 0
exit
