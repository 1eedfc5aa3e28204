// expect: reject TooManyGlobals
// One more global section than a program may refer to: each `g` is its own section.
#include "nearfs.h"

#define G(n) static const volatile __u64 g##n __attribute__((section(".rodata.g" #n))) = n;
G(0) G(1) G(2) G(3) G(4) G(5) G(6) G(7) G(8) G(9) G(10) G(11) G(12) G(13) G(14) G(15) G(16) G(17) G(18) G(19) G(20) G(21) G(22) G(23) G(24) G(25) G(26) G(27) G(28) G(29) G(30) G(31) G(32) G(33) G(34) G(35) G(36) G(37) G(38) G(39) G(40) G(41) G(42) G(43) G(44) G(45) G(46) G(47) G(48) G(49) G(50) G(51) G(52) G(53) G(54) G(55) G(56) G(57) G(58) G(59) G(60) G(61) G(62) G(63) G(64)

NEARFS_PROG("many_globals") long many_globals(struct nearfs_ctx *ctx)
{
    return g0 + g1 + g2 + g3 + g4 + g5 + g6 + g7 + g8 + g9 + g10 + g11 + g12 + g13 + g14 + g15 + g16 + g17 + g18 + g19 + g20 + g21 + g22 + g23 + g24 + g25 + g26 + g27 + g28 + g29 + g30 + g31 + g32 + g33 + g34 + g35 + g36 + g37 + g38 + g39 + g40 + g41 + g42 + g43 + g44 + g45 + g46 + g47 + g48 + g49 + g50 + g51 + g52 + g53 + g54 + g55 + g56 + g57 + g58 + g59 + g60 + g61 + g62 + g63 + g64;
}
