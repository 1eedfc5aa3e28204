/* Does nothing. Run over an empty range it reads no data, so its time through the ioctl is
 * the cost of the crossing itself: the "null ioctl" of the benchmarks. */
#include "nearfs.h"

NEARFS_PROG("null") long null(struct nearfs_ctx *ctx)
{
    return 0;
}
