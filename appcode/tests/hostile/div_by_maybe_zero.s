# expect: reject DivByZero
ldxdw %r2, [%r1+40]
mov %r0, 1
div %r0, %r2
exit
