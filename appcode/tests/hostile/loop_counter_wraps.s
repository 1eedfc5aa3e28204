# expect: reject TooComplex|Timeout
# counts to 2^64
mov %r0, 0
l:
add %r0, 1
jne %r0, 0, l
exit
