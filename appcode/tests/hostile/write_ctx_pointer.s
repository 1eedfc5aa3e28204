# expect: reject CtxField
stdw [%r1], 0
mov %r0, 0
exit
