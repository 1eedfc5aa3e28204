# expect: reject HelperArg
# unchecked: run InsnLimit
# a length taken from the file
ldxdw %r4, [%r1]
ldxdw %r3, [%r4]
ldxdw %r2, [%r1+16]
mov %r1, 0
call 1
mov %r0, 0
exit
