# expect: reject PointerArithmetic
mov %r0, %r10
sub %r0, %r1
exit
