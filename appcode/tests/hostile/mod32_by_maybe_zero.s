# expect: reject DivByZero
# the low 32 bits of 1 << 32 are zero
lddw %r2, 0x100000000
mov %r0, 1
mod32 %r0, %r2
exit
