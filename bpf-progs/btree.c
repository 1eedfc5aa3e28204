/* Point lookup in an on-disk B+-tree, one node per hop (the XRP / BPF-KV pattern: the
 * program names the next node, the runtime reads it).
 *
 * Layout (bpf-progs/README.md): 4096-byte nodes at 4096-aligned file offsets, the root
 * at offset 0. A node is { u64 leaf; u64 count; u64 keys[255]; u64 vals[255]; }, keys
 * ascending. In an inner node keys[i] is the smallest key under child i and vals[i] is
 * that child's file offset; in a leaf vals[i] is the value of keys[i].
 *
 * arg: the key (u64). Returns its value, or -1 if it is absent. */
#include "nearfs.h"

#define FANOUT 255

struct node {
    __u64 leaf;
    __u64 count;
    __u64 keys[FANOUT];
    __u64 vals[FANOUT];
};

NEARFS_PROG("btree_lookup") long btree_lookup(struct nearfs_ctx *ctx)
{
    const struct node *node = (const struct node *)(long)ctx->data;
    __u64 key = *(const __u64 *)(long)ctx->arg;
    __u64 count = node->count;
    __u64 lo = 0, hi;

    if (count > FANOUT)
        return -1; /* not a node */
    hi = count;
    /* lo = number of keys <= key */
    for (int k = 0; k < 8 && lo < hi; k++) {
        __u64 mid = (lo + hi) / 2;

        if (node->keys[mid] <= key)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1; /* smaller than every key */
    if (node->leaf)
        return node->keys[lo - 1] == key ? (long)node->vals[lo - 1] : -1;
    return nearfs_next(ctx, ctx->range_start + node->vals[lo - 1]);
}
