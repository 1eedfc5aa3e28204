# expect: reject ReturnsPointer
mov %r0, %r10
exit
