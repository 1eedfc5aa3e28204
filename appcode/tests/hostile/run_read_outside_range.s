# expect: result -34
# nearfs_read past the range returns -ERANGE
lddw %r1, 0x7fffffffffff
mov %r2, %r10
add %r2, -8
mov %r3, 8
call 1
exit
