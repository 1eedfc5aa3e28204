// expect: reject OutOfBounds line=12
// unchecked: run Access
#include "nearfs.h"

NEARFS_PROG("straddle") long straddle(struct nearfs_ctx *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    const __u8 *end = (const __u8 *)(long)ctx->data_end;

    if (data + NEARFS_WINDOW_SIZE - 4 > end)
        return 0;
    return *(const __u64 *)(data + NEARFS_WINDOW_SIZE - 4);
}
