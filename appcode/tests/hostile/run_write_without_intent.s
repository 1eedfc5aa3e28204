# expect: result -1
# nearfs_write on a read-only run returns -EPERM
stdw [%r10-8], 7
mov %r1, 0
mov %r2, %r10
add %r2, -8
mov %r3, 8
call 2
exit
