# expect: reject CtxField
# unchecked: result 2305843009213710336
# a constant offset that lands inside a pointer field
add %r1, 2
ldxdw %r0, [%r1]
exit
