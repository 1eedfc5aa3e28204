# expect: reject OutOfBounds
# unchecked: run Access
# data_end itself is one past the window
ldxdw %r2, [%r1+8]
ldxb %r0, [%r2]
exit
