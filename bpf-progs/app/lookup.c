/* lookup: finds a key in a B+-tree file on a nearfs mount with one ioctl, running
 * btree.c next to the data instead of reading one node per level.
 *
 *     clang -O2 -I bpf-progs/include bpf-progs/app/lookup.c -o lookup
 *     ./lookup /mnt/near/tree.db btree.o 42
 *
 * Prints the value (or "absent") on stdout and what the run cost on stderr. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "nearfs.h"

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* Sends the object in chunks; returns the program id, or prints the verifier's log. */
static __u64 load(int fd, const char *path)
{
    static struct nearfs_load req; /* 8 KiB: not on the stack */
    static struct nearfs_log log;
    FILE *f = fopen(path, "rb");
    __u64 session = 0, offset = 0;
    size_t n;

    if (!f)
        die(path);
    do {
        memset(&req, 0, sizeof(req));
        req.version = NEARFS_ABI_VERSION;
        req.session = session;
        req.offset = offset;
        n = fread(req.data, 1, sizeof(req.data), f);
        req.len = (__u32)n;
        if (feof(f))
            req.flags = NEARFS_LOAD_LAST;
        if (ioctl(fd, NEARFS_IOC_LOAD, &req) < 0)
            die("NEARFS_IOC_LOAD");
        session = req.session;
        offset += n;
    } while (!(req.flags & NEARFS_LOAD_LAST));
    fclose(f);
    if (req.status == 0)
        return req.prog_id;
    if (req.log_len == 0) {
        errno = -req.status;
        die("load");
    }
    memset(&log, 0, sizeof(log));
    log.version = NEARFS_ABI_VERSION;
    log.session = session;
    if (ioctl(fd, NEARFS_IOC_LOG, &log) < 0)
        die("NEARFS_IOC_LOG");
    fprintf(stderr, "rejected: %.*s\n", (int)log.len, log.text);
    exit(1);
}

int main(int argc, char **argv)
{
    struct nearfs_run_small run = {0};
    struct nearfs_version version = {.version = NEARFS_ABI_VERSION};
    struct nearfs_unload unload = {0};
    __u64 key, id;
    int fd;

    if (argc != 4) {
        fprintf(stderr, "usage: %s FILE btree.o KEY\n", argv[0]);
        return 2;
    }
    key = strtoull(argv[3], NULL, 0);
    fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        die(argv[1]);
    if (ioctl(fd, NEARFS_IOC_VERSION, &version) < 0)
        die("not a nearfs file");
    if (!(version.flags & (1u << NEARFS_ABI_VERSION))) {
        fprintf(stderr, "the daemon does not speak ABI %u (it speaks %#x)\n", NEARFS_ABI_VERSION,
                version.flags);
        return 1;
    }
    id = load(fd, argv[2]);

    run.version = NEARFS_ABI_VERSION;
    run.prog_id = id;
    run.range_off = 0;
    run.range_len = NEARFS_RANGE_TO_END;
    run.arg_len = sizeof(key);
    memcpy(run.arg, &key, sizeof(key));
    if (ioctl(fd, NEARFS_IOC_RUN_SMALL, &run) < 0)
        die("NEARFS_IOC_RUN_SMALL");
    if (run.status != 0) {
        fprintf(stderr, "run failed (error %u): %s\n", run.run_error, strerror(-run.status));
        return 1;
    }
    if ((long long)run.result == -1)
        printf("absent\n");
    else
        printf("%llu\n", (unsigned long long)run.result);
    fprintf(stderr, "hops=%llu device_bytes=%llu insns=%llu\n", (unsigned long long)run.hops,
            (unsigned long long)run.device_bytes, (unsigned long long)run.insns);

    unload.version = NEARFS_ABI_VERSION;
    unload.prog_id = id;
    ioctl(fd, NEARFS_IOC_UNLOAD, &unload);
    close(fd);
    return 0;
}
