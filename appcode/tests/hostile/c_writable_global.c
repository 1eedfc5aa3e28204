// expect: reject WritableGlobal
#include "nearfs.h"

static __u64 calls;

NEARFS_PROG("count_calls") long count_calls(struct nearfs_ctx *ctx)
{
    return ++calls;
}
