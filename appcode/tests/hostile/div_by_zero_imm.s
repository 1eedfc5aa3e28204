# expect: reject DivByZero
mov %r0, 1
div %r0, 0
exit
