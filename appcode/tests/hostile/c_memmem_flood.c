// expect: run InsnLimit insns=1000000
// 40,000 searches of the whole window in one invocation: each is charged for the bytes it
// scans, so the instruction limit ends the run long before the searches are done.
#include "nearfs.h"

NEARFS_PROG("memmem_flood") long memmem_flood(struct nearfs_ctx *ctx)
{
    const char needle[8] = "aaaaaaab";
    const __u8 *data = (const __u8 *)(long)ctx->data;
    long hits = 0;

    for (int i = 0; i < 40000; i++)
        hits += nearfs_memmem(data, NEARFS_WINDOW_SIZE, 0, needle, sizeof(needle));
    return hits;
}
