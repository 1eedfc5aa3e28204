// expect: reject StackOverflow
#include "nearfs.h"

static __attribute__((noinline)) __u64 fill(volatile __u8 *p, __u64 n)
{
    volatile __u8 big[400];

    for (int i = 0; i < 400; i++)
        big[i] = p[i];
    return big[n & 255];
}

NEARFS_PROG("overflow") long overflow(struct nearfs_ctx *ctx)
{
    volatile __u8 mine[300];

    for (int i = 0; i < 300; i++)
        mine[i] = i;
    return fill(mine, ctx->arg_len) + mine[ctx->arg_len & 255];
}
