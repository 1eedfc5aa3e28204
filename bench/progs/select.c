/* Selection over fixed-width records, for the scan benchmark: emits every record whose
 * value lies in [lo, hi], so that the bytes returned grow with the selectivity (filter.c
 * returns only their aggregate). Records and arg as in filter.c. Returns the count. */
#include "nearfs.h"

struct record {
    __u64 key;
    __u64 value;
};

#define PER_WINDOW (NEARFS_WINDOW_SIZE / sizeof(struct record))

NEARFS_PROG("select") long select_records(struct nearfs_ctx *ctx)
{
    const struct record *rec = (const struct record *)(long)ctx->data;
    const __u64 *arg = (const __u64 *)(long)ctx->arg;
    __u64 *count = (__u64 *)(long)ctx->scratch;
    __u64 left = ctx->range_end - ctx->offset;
    __u64 n = left / sizeof(struct record);

    if (n > PER_WINDOW)
        n = PER_WINDOW;
    for (__u64 i = 0; i < n; i++) {
        __u64 v = rec[i].value;
        long err;

        if (v < arg[0] || v > arg[1])
            continue;
        err = nearfs_emit(&rec[i], sizeof(rec[i]));
        if (err < 0)
            return err;
        (*count)++;
    }
    if (left > NEARFS_WINDOW_SIZE)
        return nearfs_next(ctx, ctx->offset + NEARFS_WINDOW_SIZE);
    return *count;
}
