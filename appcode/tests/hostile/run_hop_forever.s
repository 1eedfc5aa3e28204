# expect: run HopLimit hops=100
# hops to the start of its range again and again
ldxdw %r2, [%r1+48]
stxdw [%r1+80], %r2
mov %r0, 0
exit
