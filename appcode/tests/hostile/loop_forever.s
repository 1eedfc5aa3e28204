# expect: reject Loop
mov %r0, 0
l:
ja l
