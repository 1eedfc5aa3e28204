# expect: reject NotPointer
# unchecked: run Access
ldxdw %r2, [%r1+40]
ldxb %r0, [%r2]
exit
