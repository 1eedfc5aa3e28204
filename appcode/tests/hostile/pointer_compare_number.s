# expect: reject PointerCompare
mov %r0, 0
jeq %r1, 0, out
out:
exit
