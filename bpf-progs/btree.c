/* Point lookup in an on-disk B+-tree, one node per hop (the XRP / BPF-KV pattern: the
 * program names the next node, the runtime reads it).
 *
 * The node layout is in include/btree.h.
 *
 * arg: the key (u64). Returns its value, or -1 if it is absent. */
#include "btree.h"

NEARFS_PROG("btree_lookup") long btree_lookup(struct nearfs_ctx *ctx)
{
    const struct node *node = (const struct node *)(long)ctx->data;
    __u64 key = *(const __u64 *)(long)ctx->arg;
    __u64 count = node->count;
    __u64 lo;

    if (count > FANOUT)
        return -1; /* not a node */
    lo = btree_rank(node, count, key);
    if (lo == 0)
        return -1; /* smaller than every key */
    if (node->leaf)
        return node->keys[lo - 1] == key ? (long)node->vals[lo - 1] : -1;
    return nearfs_next(ctx, ctx->range_start + node->vals[lo - 1]);
}
