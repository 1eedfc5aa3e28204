# expect: reject HelperArg
# unchecked: run Access
# 64 bytes into an 8-byte stack slot
mov %r1, 0
mov %r2, %r10
add %r2, -8
mov %r3, 64
call 1
mov %r0, 0
exit
