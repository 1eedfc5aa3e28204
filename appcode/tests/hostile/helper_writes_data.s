# expect: reject HelperArg
# unchecked: run Access
ldxdw %r2, [%r1]
mov %r1, 0
mov %r3, 8
call 1
mov %r0, 0
exit
