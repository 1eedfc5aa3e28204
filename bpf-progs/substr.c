/* Substring search: emits the file offset (u64) of every occurrence of the argument
 * (1 to 64 bytes) and returns how many there were.
 *
 * Windows overlap by needle length - 1 bytes so that matches across a window boundary
 * are found once. The count lives in scratch. */
#include "nearfs.h"

#define MAX_NEEDLE 64

NEARFS_PROG("substr") long substr(struct nearfs_ctx *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    const __u8 *needle = (const __u8 *)(long)ctx->arg;
    __u64 *found = (__u64 *)(long)ctx->scratch;
    __u64 len = ctx->arg_len;
    __u64 avail = ctx->range_end - ctx->offset;
    __u64 pos = 0;

    if (len == 0 || len > MAX_NEEDLE)
        return -NEARFS_EINVAL;
    if (avail > NEARFS_WINDOW_SIZE)
        avail = NEARFS_WINDOW_SIZE;
    for (int k = 0; k < NEARFS_WINDOW_SIZE; k++) {
        long at = nearfs_memmem(data, avail, pos, needle, len);
        __u64 off;

        if (at < 0)
            break;
        off = ctx->offset + at;
        nearfs_emit(&off, sizeof(off));
        ++*found;
        pos = at + 1;
    }
    if (ctx->range_end - ctx->offset > NEARFS_WINDOW_SIZE)
        return nearfs_next(ctx, ctx->offset + NEARFS_WINDOW_SIZE - (len - 1));
    return *found;
}
