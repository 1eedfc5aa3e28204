/* Aggregate with min/max pruning over a columnar-style file (seed 002, section 3.3):
 * count and sum of the values in [lo, hi], reading only the data blocks whose
 * per-block statistics say they can hold a match.
 *
 * Layout (nearfs_client::layouts::minmax): an index of 16-byte entries from offset 0;
 * entry 0 is { u64 nblocks; u64 data_off; }, entry j (1..nblocks) is { u64 min; u64 max; }
 * of data block j, which lies at data_off + (j - 1) * 4096 and holds
 * { u64 count; u64 values[511]; }. The program walks the index window by window and hops
 * to each block that may match, then back to the index.
 *
 * arg: { u64 lo; u64 hi; }. Returns the count; emits { count, sum, blocks_read }. */
#include "nearfs.h"

#define ENTRIES_PER_WINDOW (NEARFS_WINDOW_SIZE / 16)
#define VALUES 511

struct state {
    __u64 entry; /* next index entry to look at */
    __u64 count, sum, blocks_read;
    __u64 nblocks, data_off;
};

static __u64 index_window(const struct nearfs_ctx *ctx, __u64 entry)
{
    return ctx->range_start + entry * 16 / NEARFS_WINDOW_SIZE * NEARFS_WINDOW_SIZE;
}

NEARFS_PROG("minmax") long minmax(struct nearfs_ctx *ctx)
{
    const __u64 *w = (const __u64 *)(long)ctx->data;
    const __u64 *arg = (const __u64 *)(long)ctx->arg;
    struct state *s = (struct state *)(long)ctx->scratch;
    __u64 lo = arg[0], hi = arg[1];
    __u64 at = ctx->offset - ctx->range_start;

    if (ctx->hop == 0) {
        s->nblocks = w[0];
        s->data_off = w[1];
        s->entry = 1;
    }
    if (at >= s->data_off) {
        /* A data block: aggregate it, then go back to the index. */
        __u64 n = w[0] > VALUES ? VALUES : w[0];

        for (__u64 i = 0; i < n; i++) {
            __u64 v = w[1 + i];

            if (v >= lo && v <= hi) {
                s->count++;
                s->sum += v;
            }
        }
        s->blocks_read++;
        return nearfs_next(ctx, index_window(ctx, s->entry));
    }
    /* An index window: entries [first, first + ENTRIES_PER_WINDOW). */
    __u64 first = at / 16;
    for (int k = 0; k < ENTRIES_PER_WINDOW; k++) {
        __u64 e = s->entry;

        if (e > s->nblocks)
            break;
        if (e < first || e >= first + ENTRIES_PER_WINDOW)
            return nearfs_next(ctx, index_window(ctx, e));
        __u64 slot = (e - first) & (ENTRIES_PER_WINDOW - 1);
        __u64 min = w[2 * slot], max = w[2 * slot + 1];

        s->entry = e + 1;
        if (max >= lo && min <= hi)
            return nearfs_next(ctx, ctx->range_start + s->data_off + (e - 1) * NEARFS_WINDOW_SIZE);
    }
    if (s->entry <= s->nblocks)
        return nearfs_next(ctx, index_window(ctx, s->entry));
    __u64 result[3] = {s->count, s->sum, s->blocks_read};
    nearfs_emit(result, sizeof(result));
    return s->count;
}
