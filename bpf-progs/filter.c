/* Filter and aggregate over fixed-width records: count, sum, min and max of the values
 * that lie in [lo, hi].
 *
 * Records are 16 bytes, { u64 key; u64 value; }, little-endian. arg: { u64 lo; u64 hi; }.
 * Returns the count and emits { u64 count, sum, min, max; } once, at the end. The running
 * aggregate lives in scratch memory, which survives the hops. */
#include "nearfs.h"

struct record {
    __u64 key;
    __u64 value;
};

struct aggregate {
    __u64 count, sum, min, max;
};

#define PER_WINDOW (NEARFS_WINDOW_SIZE / sizeof(struct record))

NEARFS_PROG("filter") long filter(struct nearfs_ctx *ctx)
{
    const struct record *rec = (const struct record *)(long)ctx->data;
    const __u64 *arg = (const __u64 *)(long)ctx->arg;
    struct aggregate *agg = (struct aggregate *)(long)ctx->scratch;
    __u64 left = ctx->range_end - ctx->offset;
    __u64 n = left / sizeof(struct record);

    if (ctx->hop == 0)
        agg->min = ~0ULL;
    if (n > PER_WINDOW)
        n = PER_WINDOW;
    for (__u64 i = 0; i < n; i++) {
        __u64 v = rec[i].value;

        if (v < arg[0] || v > arg[1])
            continue;
        agg->count++;
        agg->sum += v;
        if (v < agg->min)
            agg->min = v;
        if (v > agg->max)
            agg->max = v;
    }
    if (left > NEARFS_WINDOW_SIZE)
        return nearfs_next(ctx, ctx->offset + NEARFS_WINDOW_SIZE);
    nearfs_emit(agg, sizeof(*agg));
    return agg->count;
}
