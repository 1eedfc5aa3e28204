// expect: result -34 zeros=480
// A read outside the range fails with -ERANGE; the buffer it was given goes out through
// nearfs_emit. It holds zeros, never what the stack held before.
#include "nearfs.h"

NEARFS_PROG("failed_read") long failed_read(struct nearfs_ctx *ctx)
{
    __u8 buf[480];
    long r = nearfs_read(~0ULL, buf, sizeof(buf));

    nearfs_emit(buf, sizeof(buf));
    return r;
}
