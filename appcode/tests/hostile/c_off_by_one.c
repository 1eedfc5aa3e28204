// expect: reject OutOfBounds line=11
// unchecked: run Access
#include "nearfs.h"

NEARFS_PROG("off_by_one") long off_by_one(struct nearfs_ctx *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    __u64 sum = 0;

    for (int i = 0; i <= NEARFS_WINDOW_SIZE; i++)
        sum += data[i];
    return sum;
}
