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

#endif
