/* Read-modify-write: increment the counter of a key-value record after checking its full
 * key (seed 002, section 3.2), with the helper style of I/O.
 *
 * Records are 64 bytes, { u8 key[56]; u64 counter; }. arg: { u64 slot; u8 key[56]; }.
 * Returns the new counter, -NEARFS_ERANGE past the file, or -2 (ENOENT) if the slot holds
 * another key. Needs a run with write intent. */
#include "nearfs.h"

#define KEY_SIZE 56

struct record {
    __u8 key[KEY_SIZE];
    __u64 counter;
};

struct request {
    __u64 slot;
    __u8 key[KEY_SIZE];
};

NEARFS_PROG("kv_increment") long kv_increment(struct nearfs_ctx *ctx)
{
    const struct request *req = (const struct request *)(long)ctx->arg;
    struct record rec;
    __u64 off = ctx->range_start + req->slot * sizeof(rec);
    long err;

    if (req->slot >= (1ULL << 40))
        return -NEARFS_ERANGE;
    err = nearfs_read(off, &rec, sizeof(rec));
    if (err < 0)
        return err;
    if (nearfs_memcmp(rec.key, req->key, KEY_SIZE) != 0)
        return -2;
    rec.counter++;
    err = nearfs_write(off + KEY_SIZE, &rec.counter, sizeof(rec.counter));
    if (err < 0)
        return err;
    return rec.counter;
}
