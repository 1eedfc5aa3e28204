// expect: run Timeout wall_ms=1
// The same 40,000 searches under a 1 ms clock: the clock is checked inside the invocation,
// not only between hops, so the run stops long before the searches are done.
#include "nearfs.h"

NEARFS_PROG("memmem_clock") long memmem_clock(struct nearfs_ctx *ctx)
{
    const char needle[8] = "aaaaaaab";
    const __u8 *data = (const __u8 *)(long)ctx->data;
    long hits = 0;

    for (int i = 0; i < 40000; i++)
        hits += nearfs_memmem(data, NEARFS_WINDOW_SIZE, 0, needle, sizeof(needle));
    return hits;
}
