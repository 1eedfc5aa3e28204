# expect: reject PointerOffset
# unchecked: run Access
# scratch minus a number read from the file, bounded only by a signed compare with the
# end: a verifier that let the compare bound the pointer, not seeing that the subtraction
# can take it anywhere, would let the store below go anywhere. Refused at the subtraction.
ldxdw %r2, [%r1+16]
mov %r3, %r2
add %r3, 4088
ldxdw %r6, [%r1]
ldxdw %r4, [%r6]
neg %r4
mov %r5, %r2
add %r5, %r4
jsgt %r5, %r3, out
stdw [%r5], 1
out:
mov %r0, 0
exit
