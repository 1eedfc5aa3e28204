// expect: reject OutOfBounds
// unchecked: result 65536
#include "nearfs.h"

/* Reads the context at an offset the caller chooses. */
NEARFS_PROG("ctx_index") long ctx_index(struct nearfs_ctx *ctx)
{
    return *(const __u64 *)((const char *)ctx + (ctx->arg_len & 0xff));
}
