# expect: reject Loop
mov %r0, 0
l:
add %r0, 0
jeq %r0, 0, l
exit
