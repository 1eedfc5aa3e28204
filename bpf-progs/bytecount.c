/* Counts the bytes equal to arg[0] in the run's range: one window per hop, the running
 * total kept in scratch memory. The byte scan of the runtime benchmark. */
#include "nearfs.h"

NEARFS_PROG("bytecount") long bytecount(struct nearfs_ctx *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    __u64 *total = (__u64 *)(long)ctx->scratch;
    __u8 want = *(const __u8 *)(long)ctx->arg;
    __u64 n = ctx->range_end - ctx->offset;
    __u64 count = 0;

    if (n > NEARFS_WINDOW_SIZE)
        n = NEARFS_WINDOW_SIZE;
    for (__u64 i = 0; i < n; i++)
        count += data[i] == want;
    *total += count;
    if (ctx->range_end - ctx->offset > NEARFS_WINDOW_SIZE)
        return nearfs_next(ctx, ctx->offset + NEARFS_WINDOW_SIZE);
    return *total;
}
