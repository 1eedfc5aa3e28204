# expect: reject FallsOffEnd
mov %r0, 0
