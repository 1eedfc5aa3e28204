# expect: reject BadTarget
mov %r0, 0
ja +5
exit
