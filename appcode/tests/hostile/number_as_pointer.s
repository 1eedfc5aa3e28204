# expect: reject NotPointer
ldxdw %r2, [%r1+40]
ldxb %r0, [%r2]
exit
