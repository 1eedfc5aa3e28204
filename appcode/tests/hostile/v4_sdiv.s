# expect: reject Unsupported
mov %r0, 7
sdiv %r0, 2
exit
