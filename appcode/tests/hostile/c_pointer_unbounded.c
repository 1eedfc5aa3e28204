// expect: reject PointerOffset
// unchecked: run Access
// The pointer class in C: scratch moved back by a number from the file, bounded only by a
// signed compare with the end, then written through.
#include "nearfs.h"

NEARFS_PROG("pointer_unbounded") long pointer_unbounded(struct nearfs_ctx *ctx)
{
    __u8 *s = (__u8 *)(long)ctx->scratch;
    __u64 x = *(const __u64 *)(long)ctx->data;
    __u8 *p = s - x;

    if ((long)p > (long)(s + NEARFS_SCRATCH_SIZE - 8))
        return 0;
    *(__u64 *)p = 1;
    return 1;
}
