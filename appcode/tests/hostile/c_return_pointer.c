// expect: reject ReturnsPointer
#include "nearfs.h"

NEARFS_PROG("leak") long leak(struct nearfs_ctx *ctx)
{
    return (long)ctx->data;
}
