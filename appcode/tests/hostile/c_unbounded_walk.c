// expect: reject Loop
#include "nearfs.h"

/* Follows "next" indices through the window until it finds a zero: nothing bounds it. */
NEARFS_PROG("walk") long walk(struct nearfs_ctx *ctx)
{
    const __u8 *data = (const __u8 *)(long)ctx->data;
    __u64 i = 0, steps = 0;

    while (data[i & 4095] != 0) {
        i = i * 31 + data[i & 4095];
        steps++;
    }
    return steps;
}
