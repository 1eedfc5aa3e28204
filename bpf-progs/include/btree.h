/* The node of the example B+-tree (btree.c, btree_range.c; nearfs_client::layouts::btree):
 * 4096 bytes at 4096-aligned file offsets, the root at offset 0. keys ascend. In an inner
 * node keys[i] is the smallest key under child i and vals[i] the child's file offset,
 * and leaf is 0; in a leaf vals[i] is the value of keys[i], and leaf is 1 | the file
 * offset of the next leaf (1 alone for the last). */
#ifndef NEARFS_BTREE_H
#define NEARFS_BTREE_H

#include "nearfs.h"

#define FANOUT 255

struct node {
    __u64 leaf;
    __u64 count;
    __u64 keys[FANOUT];
    __u64 vals[FANOUT];
};

/* How many of the node's first count keys are <= key (count <= FANOUT): a binary search of
 * at most 8 steps, a bound the verifier sees. */
static inline __u64 btree_rank(const struct node *node, __u64 count, __u64 key)
{
    __u64 lo = 0, hi = count;

    for (int k = 0; k < 8 && lo < hi; k++) {
        __u64 mid = (lo + hi) / 2;

        if (node->keys[mid] <= key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

#endif
