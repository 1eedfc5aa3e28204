# expect: reject OutOfBounds
# unchecked: run Access
stdw [%r10-4], 1
mov %r0, 0
exit
