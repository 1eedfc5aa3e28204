# expect: run WriteLimit write_bytes=65536 writable
# a thousand 8-byte writes of the first record, each buffered until the run ends: the
# buffer is bounded, whatever the instruction budget allows
stdw [%r10-8], 7
mov %r6, 0
l:
mov %r1, 0
mov %r2, %r10
add %r2, -8
mov %r3, 8
call 2
add %r6, 1
jlt %r6, 1000, l
mov %r0, 0
exit
