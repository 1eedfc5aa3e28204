/* Many point lookups in one run: btree.c for a batch of keys, so that one ioctl's crossing
 * is shared by all of them. The chain goes down the tree for the first key, back to the
 * root, down for the next, and so on; scratch memory remembers which key is being looked
 * up across the hops.
 *
 * arg: up to NEARFS_ARG_SIZE / 8 keys (u64). Emits one u64 per key, in order: its value,
 * or ~0 if it is absent. Returns the number of keys, or -1 if a node is corrupt. */
#include "btree.h"

#define MAX_KEYS (NEARFS_ARG_SIZE / 8)

NEARFS_PROG("btree_batch") long btree_batch(struct nearfs_ctx *ctx)
{
    const struct node *node = (const struct node *)(long)ctx->data;
    const __u64 *keys = (const __u64 *)(long)ctx->arg;
    __u64 *current = (__u64 *)(long)ctx->scratch;
    __u64 n = ctx->arg_len / 8;
    __u64 i = *current;
    __u64 count = node->count;
    __u64 lo, key, value = ~0ULL;

    if (n > MAX_KEYS)
        n = MAX_KEYS;
    if (i >= n)
        return n;
    if (count > FANOUT)
        return -1; /* not a node */
    key = keys[i];
    lo = btree_rank(node, count, key);
    if (lo > 0 && !node->leaf)
        return nearfs_next(ctx, ctx->range_start + node->vals[lo - 1]);
    if (lo > 0 && node->keys[lo - 1] == key)
        value = node->vals[lo - 1];
    nearfs_emit(&value, sizeof(value));
    *current = i + 1;
    if (i + 1 < n)
        return nearfs_next(ctx, ctx->range_start);
    return n;
}
