/* nearfs appcode ABI: the context, helpers and sizes a program may rely on.
 *
 * Mirrors appcode/src/abi.rs; docs/abi.md explains it. Compile appcode with
 *     clang -O2 -g -target bpf -mcpu=v3 -I bpf-progs/include -c prog.c -o prog.o
 * and put each program in its own section:
 *     NEARFS_PROG("name") long name(struct nearfs_ctx *ctx) { ... }
 */
#ifndef NEARFS_H
#define NEARFS_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef signed int __s32;
typedef unsigned long long __u64;
typedef signed long long __s64;

#define NEARFS_WINDOW_SIZE 4096  /* bytes of the file per invocation */
#define NEARFS_SCRATCH_SIZE 4096 /* per-run memory, zeroed at start, kept across hops */
#define NEARFS_ARG_SIZE 1024     /* largest argument blob */
#define NEARFS_STACK_SIZE 512    /* stack of a program and everything it calls */
#define NEARFS_NO_NEXT (~0ULL)

/* r1 on entry. Pointers are 64-bit fields; only `next` is writable. */
struct nearfs_ctx {
    __u64 data;        /* the data window: NEARFS_WINDOW_SIZE bytes at file offset `offset` */
    __u64 data_end;    /* data + NEARFS_WINDOW_SIZE; compare against it before each access */
    __u64 scratch;     /* NEARFS_SCRATCH_SIZE bytes */
    __u64 arg;         /* the caller's argument blob, NEARFS_ARG_SIZE bytes, zero past arg_len */
    __u64 arg_len;
    __u64 offset;      /* file offset of data[0] */
    __u64 range_start; /* the run may use file bytes [range_start, range_end) */
    __u64 range_end;
    __u64 file_size;   /* bytes past it, and holes, read as zeros */
    __u64 hop;         /* 0 on the first invocation, then one more per hop */
    __u64 next;        /* set to a file offset to be invoked again with the window there */
};

#define NEARFS_PROG(name) __attribute__((section("nearfs/" name), used))

/* Helpers. Each returns 0 (or a result) on success and -errno on failure. */
#define NEARFS_HELPER_READ 1
#define NEARFS_HELPER_WRITE 2
#define NEARFS_HELPER_EMIT 3
#define NEARFS_HELPER_MEMCMP 4
#define NEARFS_HELPER_MEMMEM 5

/* Copies len file bytes at file offset off into dst (stack or scratch). */
static long (*const nearfs_read)(__u64 off, void *dst, __u64 len) = (void *)NEARFS_HELPER_READ;
/* Writes len bytes from src at file offset off; only in runs with write intent, only over
 * bytes the file has allocated. Applied when the run succeeds, all or nothing. */
static long (*const nearfs_write)(__u64 off, const void *src, __u64 len) = (void *)NEARFS_HELPER_WRITE;
/* Appends len bytes to the run's output. */
static long (*const nearfs_emit)(const void *src, __u64 len) = (void *)NEARFS_HELPER_EMIT;
/* Compares len bytes: <0, 0 or >0, as memcmp. */
static long (*const nearfs_memcmp)(const void *a, const void *b, __u64 len) = (void *)NEARFS_HELPER_MEMCMP;
/* Offset in hay of the first occurrence of needle at or after start, or -1. Pass the
 * start as a number rather than moving hay, so that the verifier can bound hay_len. */
static long (*const nearfs_memmem)(const void *hay, __u64 hay_len, __u64 start,
                                   const void *needle, __u64 needle_len) = (void *)NEARFS_HELPER_MEMMEM;

/* Ends this invocation and asks for another with the window at file offset off. */
static inline long nearfs_next(struct nearfs_ctx *ctx, __u64 off)
{
    ctx->next = off;
    return 0;
}

#define NEARFS_ERANGE 34
#define NEARFS_EPERM 1
#define NEARFS_ENOSPC 28
#define NEARFS_EIO 5
#define NEARFS_EINVAL 22

/* ---- For applications: the offload ioctls (nearfs_client::abi in Rust). ----
 * Every struct is fixed-size and little-endian, starts with {version, flags}, and is
 * passed whole: ioctl(fd, NEARFS_IOC_RUN_SMALL, &run). `version` is an ABI version the
 * caller speaks (NEARFS_ABI_VERSION), no older than the struct; the daemon serves every
 * version it still speaks.
 * Version 2 added nearfs_run_small; every struct of version 1 is unchanged, so programs
 * built against version 1 keep working. Errors that carry no data are the
 * ioctl's errno (ENOENT: no such program, EBADF: the handle's mode, EPERM/EACCES:
 * policy or permissions, EPROTO: another ABI version, EOVERFLOW: a range that wraps,
 * EISDIR: a run on a directory, EAGAIN: too many runs of this user). A rejected load
 * and a failed run complete the ioctl and say so in `status`. */
#define NEARFS_ABI_VERSION 2
#define NEARFS_ABI_VERSIONS ((1 << 1) | (1 << 2)) /* bit v: version v is spoken */
#define NEARFS_LOAD_CHUNK 8192
#define NEARFS_LOG_CHUNK 8192
#define NEARFS_OUT_CHUNK 8192
#define NEARFS_SMALL_ARG 64 /* argument and output bytes inline in nearfs_run_small */
#define NEARFS_SMALL_OUT 64
#define NEARFS_LIST_ENTRIES 32
#define NEARFS_NAME_SIZE 64
#define NEARFS_RANGE_TO_END (~0ULL)
#define NEARFS_LOAD_LAST 1 /* nearfs_load.flags: the final chunk */
#define NEARFS_RUN_WRITE 1 /* nearfs_run.flags: the program may write the file */

/* nearfs_run.run_error: what ended a failed run. */
#define NEARFS_RUN_E_INSNS 1
#define NEARFS_RUN_E_HOPS 2
#define NEARFS_RUN_E_DEVICE_BYTES 3
#define NEARFS_RUN_E_OUTPUT_BYTES 4
#define NEARFS_RUN_E_TIMEOUT 5
#define NEARFS_RUN_E_OUT_OF_RANGE 6
#define NEARFS_RUN_E_IO 7
#define NEARFS_RUN_E_FAULT 8
#define NEARFS_RUN_E_ARG 9
#define NEARFS_RUN_E_ACCESS 10 /* the engine refused a memory access (a verifier bug) */
#define NEARFS_RUN_E_WRITE_BYTES 11

struct nearfs_version {
    __u32 version; /* in: the newest version the caller speaks; out: that version if the
                      daemon speaks it, else 1 (any version may ask) */
    __u32 flags;   /* out: every version the daemon speaks, as NEARFS_ABI_VERSIONS */
};

struct nearfs_load {
    __u32 version, flags;
    __u64 session; /* in: 0 for the first chunk, then the value returned */
    __u64 offset;  /* in: where this chunk goes in the object */
    __u32 len;     /* in: bytes of data used */
    __s32 status;  /* out: 0, or -errno (-EINVAL: rejected; fetch the log) */
    __u64 prog_id; /* out: after the last chunk */
    __u32 log_len; /* out: bytes of verifier log (NEARFS_IOC_LOG with this session) */
    __u32 pad;
    char name[NEARFS_NAME_SIZE]; /* in: NAME of section nearfs/NAME, or "" for the only one */
    __u8 data[NEARFS_LOAD_CHUNK];
};

struct nearfs_log {
    __u32 version, flags;
    __u64 session; /* in: the rejected load's session */
    __u64 offset;  /* in */
    __u32 len;     /* out: bytes in text */
    __u32 total;   /* out: bytes of the whole log */
    char text[NEARFS_LOG_CHUNK];
};

struct nearfs_unload {
    __u32 version, flags;
    __u64 prog_id;
};

struct nearfs_prog_info {
    __u64 id;
    __u32 owner;     /* uid of the loader */
    __u32 insns;
    __u64 max_insns; /* verified worst case per invocation */
    char name[NEARFS_NAME_SIZE];
};

struct nearfs_list {
    __u32 version, flags;
    __u64 cursor; /* in: 0, then next */
    __u64 next;   /* out: 0 at the end */
    __u32 count;  /* out: entries filled */
    __u32 pad;
    struct nearfs_prog_info entries[NEARFS_LIST_ENTRIES];
};

struct nearfs_run {
    __u32 version, flags;
    __u64 prog_id;
    __u64 range_off, range_len; /* the file bytes the program may use */
    __u32 arg_len;
    __u32 out_len;      /* out: bytes in out */
    __s32 status;       /* out: 0, or -errno of a failed run (nothing written) */
    __u32 run_error;    /* out: NEARFS_RUN_E_* */
    __u64 result;       /* out: r0 */
    __u64 insns, hops, device_bytes, output_bytes; /* out: costs */
    __u64 more;         /* out: token for NEARFS_IOC_MORE, 0 if out holds everything */
    __u8 arg[NEARFS_ARG_SIZE];
    __u8 out[NEARFS_OUT_CHUNK];
};

/* Version 2: the same fields with what a lookup needs inline, 224 bytes each way. Output
 * past the first NEARFS_SMALL_OUT bytes comes back with NEARFS_IOC_MORE. */
struct nearfs_run_small {
    __u32 version, flags;
    __u64 prog_id;
    __u64 range_off, range_len;
    __u32 arg_len;      /* at most NEARFS_SMALL_ARG (larger ones: nearfs_run) */
    __u32 out_len;
    __s32 status;
    __u32 run_error;
    __u64 result;
    __u64 insns, hops, device_bytes, output_bytes;
    __u64 more;
    __u8 arg[NEARFS_SMALL_ARG];
    __u8 out[NEARFS_SMALL_OUT];
};

struct nearfs_more {
    __u32 version, flags;
    __u64 token; /* in */
    __u32 len;   /* out: bytes in out */
    __u32 left;  /* out: bytes still waiting */
    __u8 out[NEARFS_OUT_CHUNK];
};

#ifndef __bpf__
#include <linux/ioctl.h>
#define NEARFS_IOC_VERSION _IOWR('N', 1, struct nearfs_version)
#define NEARFS_IOC_LOAD _IOWR('N', 2, struct nearfs_load)
#define NEARFS_IOC_LOG _IOWR('N', 3, struct nearfs_log)
#define NEARFS_IOC_UNLOAD _IOWR('N', 4, struct nearfs_unload)
#define NEARFS_IOC_LIST _IOWR('N', 5, struct nearfs_list)
#define NEARFS_IOC_RUN _IOWR('N', 6, struct nearfs_run)
#define NEARFS_IOC_MORE _IOWR('N', 7, struct nearfs_more)
#define NEARFS_IOC_RUN_SMALL _IOWR('N', 8, struct nearfs_run_small)
#endif

#endif
