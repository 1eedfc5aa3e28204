# expect: reject CtxField
# unchecked: result 1073745920
ldxw %r0, [%r1]
exit
