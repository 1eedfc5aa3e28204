# expect: reject Uninit
# r1-r5 do not survive a helper call
ldxdw %r6, [%r1+16]
mov %r1, %r6
mov %r2, 8
call 3
mov %r0, %r2
exit
