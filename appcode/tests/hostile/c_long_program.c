// expect: result -8533519100157989412
// Thousands of instructions unrolled: far more than rbpf's JIT could hold in its one page.
#include "nearfs.h"

NEARFS_PROG("long_program") long long_program(struct nearfs_ctx *ctx)
{
    __u64 v = ctx->hop;

#pragma clang loop unroll(full)
    for (int i = 0; i < 3000; i++)
        v = v * 31 + i;
    return v;
}
