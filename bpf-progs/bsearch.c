/* Binary search for a key in a file of sorted little-endian u64s.
 *
 * arg: the key (u64). Returns the key's index, or -1. Each hop places the window
 * around the middle of the candidates [lo, hi) (kept in scratch); a window either
 * holds the key's place, and the search finishes inside it, or narrows [lo, hi)
 * past its whole span. */
#include "nearfs.h"

#define PER_WINDOW (NEARFS_WINDOW_SIZE / 8)

struct search {
    __u64 lo, hi; /* candidate entry indices */
};

NEARFS_PROG("bsearch") long bsearch(struct nearfs_ctx *ctx)
{
    const __u64 *win = (const __u64 *)(long)ctx->data;
    struct search *s = (struct search *)(long)ctx->scratch;
    __u64 key = *(const __u64 *)(long)ctx->arg;
    __u64 first = (ctx->offset - ctx->range_start) / 8; /* index of win[0] */
    __u64 n = (ctx->range_end - ctx->offset) / 8;       /* entries in the window */

    if (ctx->hop == 0) {
        s->lo = 0;
        s->hi = (ctx->range_end - ctx->range_start) / 8;
    }
    if (n > PER_WINDOW)
        n = PER_WINDOW;
    if (n == 0 || s->lo >= s->hi)
        return -1;
    if (key < win[0]) {
        if (s->hi > first)
            s->hi = first;
    } else if (key > win[(n - 1) & (PER_WINDOW - 1)]) {
        if (s->lo < first + n)
            s->lo = first + n;
    } else {
        /* The key's place is inside this window. */
        __u64 l = 0, h = n;

        for (int k = 0; k < 13 && l < h; k++) {
            __u64 m = (l + h) / 2;

            if (win[m & (PER_WINDOW - 1)] < key)
                l = m + 1;
            else
                h = m;
        }
        if (l < n && win[l & (PER_WINDOW - 1)] == key)
            return first + l;
        return -1;
    }
    if (s->lo >= s->hi)
        return -1;
    __u64 mid = s->lo + (s->hi - s->lo) / 2;
    __u64 start = mid > PER_WINDOW / 2 ? mid - PER_WINDOW / 2 : 0;
    return nearfs_next(ctx, ctx->range_start + start * 8);
}
