# expect: reject PointerLeak
mov32 %r0, %r1
exit
