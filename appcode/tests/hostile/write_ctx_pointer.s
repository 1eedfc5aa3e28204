# expect: reject CtxField
# unchecked: run Access
stdw [%r1], 0
mov %r0, 0
exit
