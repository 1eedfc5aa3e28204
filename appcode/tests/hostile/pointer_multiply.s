# expect: reject PointerArithmetic
mov %r0, %r1
mul %r0, 2
exit
