# expect: reject HelperArg
# unchecked: reject HelperArg
# emits stack bytes that were never written
mov %r1, %r10
add %r1, -16
mov %r2, 16
call 3
mov %r0, 0
exit
