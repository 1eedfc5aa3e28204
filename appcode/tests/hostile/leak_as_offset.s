# expect: reject HelperArg
# unchecked: reject HelperArg
# a pointer passed where the helper wants a file offset
mov %r3, 8
mov %r2, %r10
add %r2, -8
call 1
mov %r0, 0
exit
