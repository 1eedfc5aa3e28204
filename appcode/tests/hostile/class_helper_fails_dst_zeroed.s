# expect: result -34 zeros=480
# nearfs_read of an offset outside the range fails with -ERANGE; the 480 stack bytes it
# was given then go out through nearfs_emit. They must be zeros, never what the stack
# held before (another run's data, or the daemon's).
mov %r1, -1
mov %r2, %r10
add %r2, -480
mov %r3, 480
call 1
mov %r6, %r0
mov %r1, %r10
add %r1, -480
mov %r2, 480
call 3
mov %r0, %r6
exit
