# expect: reject HelperArg
# unchecked: reject HelperArg
stxdw [%r10-8], %r1
mov %r1, %r10
add %r1, -8
mov %r2, 8
call 3
mov %r0, 0
exit
