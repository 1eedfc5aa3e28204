# expect: reject HelperArg
mov %r2, 8
call 3
mov %r0, 0
exit
