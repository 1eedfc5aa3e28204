/* Range query on the B+-tree of btree.c: emits every (key, value) with lo <= key <= hi,
 * in key order, and returns how many there were. It goes down to the leaf where lo
 * belongs, then along the leaf chain (a leaf's first word is 1 | next leaf's offset),
 * one node per hop; the count lives in scratch memory.
 *
 * arg: { u64 lo; u64 hi; }. Output: { u64 key; u64 value; } per match. */
#include "btree.h"

NEARFS_PROG("btree_range") long btree_range(struct nearfs_ctx *ctx)
{
    const struct node *node = (const struct node *)(long)ctx->data;
    const __u64 *arg = (const __u64 *)(long)ctx->arg;
    __u64 *found = (__u64 *)(long)ctx->scratch;
    __u64 lo = arg[0], hi = arg[1];
    __u64 count = node->count;

    if (count > FANOUT)
        return -1; /* not a node */
    if (!node->leaf) {
        /* The child holding lo: the last whose first key is <= lo (or the first). */
        __u64 l = btree_rank(node, count, lo);

        if (count == 0)
            return -1;
        return nearfs_next(ctx, ctx->range_start + node->vals[l > 0 ? l - 1 : 0]);
    }
    for (__u64 i = 0; i < count; i++) {
        __u64 pair[2] = {node->keys[i], node->vals[i]};

        if (pair[0] < lo || pair[0] > hi)
            continue;
        nearfs_emit(pair, sizeof(pair));
        ++*found;
    }
    if (count > 0 && node->keys[count - 1] <= hi && node->leaf > 1)
        return nearfs_next(ctx, ctx->range_start + (node->leaf & ~1ULL));
    return *found;
}
