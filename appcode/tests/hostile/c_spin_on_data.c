// expect: reject Loop
#include "nearfs.h"

NEARFS_PROG("spin") long spin(struct nearfs_ctx *ctx)
{
    volatile const __u8 *data = (volatile const __u8 *)(long)ctx->data;

    while (data[0] != 0)
        ;
    return 0;
}
