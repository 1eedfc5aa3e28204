// expect: reject HelperArg line=11
// unchecked: reject UninitStack
#include "nearfs.h"

NEARFS_PROG("lies") long lies(struct nearfs_ctx *ctx)
{
    __u8 buf[16];
    __u64 len = ctx->arg_len;

    /* len may be up to NEARFS_ARG_SIZE; buf has 16 bytes. */
    if (nearfs_read(0, buf, len) < 0)
        return -1;
    return buf[0];
}
