# expect: reject HelperArg
# unchecked: result 0
mov %r2, 8
call 3
mov %r0, 0
exit
