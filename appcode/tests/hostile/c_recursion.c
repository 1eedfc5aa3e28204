// expect: reject Recursion
#include "nearfs.h"

static __attribute__((noinline)) __u64 depth(const __u8 *p, __u64 n)
{
    if (n == 0 || p[0] == 0)
        return 0;
    return 1 + depth(p, n - 1) * p[0];
}

NEARFS_PROG("recurse") long recurse(struct nearfs_ctx *ctx)
{
    return depth((const __u8 *)(long)ctx->data, 1000);
}
