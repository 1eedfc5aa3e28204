# expect: reject UnknownHelper
# found by the verify fuzz target: dead code still reaches rbpf's JIT
mov %r0, -1
jslt %r0, 0, +1
call 1026
exit
