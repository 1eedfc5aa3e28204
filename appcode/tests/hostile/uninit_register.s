# expect: reject Uninit
mov %r0, %r5
exit
