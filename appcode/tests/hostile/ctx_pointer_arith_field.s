# expect: reject CtxField
# a constant offset that lands inside a pointer field
add %r1, 2
ldxdw %r0, [%r1]
exit
