#!/usr/bin/env bash
# nearfs vs ext4 with fio: sequential 1 MiB read/write, 4 KiB random read/write, and
# metadata operations per second. Both filesystems sit on a loop device of the same size
# over sparse files in the same directory (--dir; tmpfs by default, so that the device is
# memory and the numbers measure the filesystems rather than a virtual disk's caching).
# Caches are dropped before every read job. Needs root.
#
# Each repeat is a full cycle on a fresh file (write, read, random read, random write,
# delete); the table shows the median of --repeat cycles (default 5) and their range.
#
#   scripts/bench-fs.sh [--dir /dev/shm] [--size 4G] [--file-size 1G] [--runtime 10] [--repeat 5]
#                       [--nearfs-options OPTS] [--out docs/benchmarks.md]
# --nearfs-options passes `-o OPTS` to the nearfs mount (for example `direct`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DIR=/dev/shm SIZE=4G FILE_SIZE=1G RUNTIME=10 REPEAT=5 OUT=docs/benchmarks.md NEARFS_OPTS=
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --file-size) FILE_SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --nearfs-options) NEARFS_OPTS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

install_packages
enable_fuse_uring
cargo build --release --quiet
NEARFS=$PWD/target/release/nearfs

work=$(mktemp -d "$DIR/nearfs-bench.XXXXXX")
loops=()
cleanup() {
    for m in "$work/ext4" "$work/nearfs"; do mountpoint -q "$m" && umount "$m"; done
    # The nearfs daemon closes its device a moment after the unmount returns; a loop device
    # detached too early stays attached, and keeps its deleted image's memory in tmpfs.
    for l in "${loops[@]}"; do
        for _ in $(seq 50); do losetup -d "$l" 2>/dev/null && break; sleep 0.2; done
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ext4" "$work/nearfs" "$work/results"

loop_for() {
    truncate -s "$SIZE" "$1"
    losetup -f --show "$1"
}
# Recorded here, not in loop_for: that runs in a subshell, whose array the cleanup never sees.
ext4_dev=$(loop_for "$work/ext4.img")
loops+=("$ext4_dev")
nearfs_dev=$(loop_for "$work/nearfs.img")
loops+=("$nearfs_dev")
mkfs.ext4 -q -F "$ext4_dev"
mount "$ext4_dev" "$work/ext4"
"$NEARFS" mkfs "$nearfs_dev" --force >/dev/null
"$NEARFS" mount "$nearfs_dev" "$work/nearfs" ${NEARFS_OPTS:+-o "$NEARFS_OPTS"}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# fio_job FS NAME RUN RW BS [extra fio args]
fio_job() {
    local fs=$1 name=$2 run=$3 rw=$4 bs=$5
    shift 5
    case $rw in *read*) drop_caches ;; esac
    fio --name="$name" --directory="$work/$fs" --filename=bench.dat --size="$FILE_SIZE" \
        --rw="$rw" --bs="$bs" --ioengine=psync --numjobs=1 --group_reporting \
        --output-format=json "$@" >"$work/results/$fs-$name-$run.json"
}

for fs in ext4 nearfs; do
    echo "==> $fs"
    for i in $(seq "$REPEAT"); do
        fio_job "$fs" seqwrite "$i" write 1M --end_fsync=1
        fio_job "$fs" seqread "$i" read 1M
        fio_job "$fs" randread "$i" randread 4k --runtime="$RUNTIME" --time_based
        fio_job "$fs" randwrite "$i" randwrite 4k --runtime="$RUNTIME" --time_based --end_fsync=1
        rm -f "$work/$fs/bench.dat"
        sync
        python3 - "$work/$fs/meta$i" >"$work/results/$fs-meta-$i.json" <<'PY'
import json, os, shutil, sys, time
d = sys.argv[1]
os.makedirs(d)
n = 5000
def timed(f):
    t = time.perf_counter(); f(); return n / (time.perf_counter() - t)
names = [os.path.join(d, f"f{i}") for i in range(n)]
res = {
    "create": timed(lambda: [os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)) for p in names]),
    "stat": timed(lambda: [os.stat(p) for p in names]),
    "rename": timed(lambda: [os.rename(p, p + "r") for p in names]),
    "unlink": timed(lambda: [os.unlink(p + "r") for p in names]),
}
os.rmdir(d)
print(json.dumps(res))
PY
    done
done

BENCH_DIR=$DIR NEARFS_OPTS=$NEARFS_OPTS python3 - "$work/results" "$OUT" "$SIZE" "$FILE_SIZE" "$RUNTIME" "$REPEAT" <<'PY'
import json, os, platform, statistics, sys, datetime
res, out, size, fsize, runtime, repeat = sys.argv[1:]
runs = range(1, int(repeat) + 1)
def fio(fs, name, what):
    def one(i):
        j = json.load(open(f"{res}/{fs}-{name}-{i}.json"))["jobs"][0]
        side = j["read"] if "read" in name else j["write"]
        return side["bw_bytes"] / 2**20 if what == "MiB/s" else side["iops"]
    return [one(i) for i in runs]
rows = []
for name, label, what in [("seqwrite", "sequential write 1 MiB", "MiB/s"),
                          ("seqread", "sequential read 1 MiB (cold cache)", "MiB/s"),
                          ("randread", "random read 4 KiB (cold cache)", "IOPS"),
                          ("randwrite", "random write 4 KiB", "IOPS")]:
    rows.append((label, what, fio("ext4", name, what), fio("nearfs", name, what)))
for op in ["create", "stat", "rename", "unlink"]:
    e = [json.load(open(f"{res}/ext4-meta-{i}.json"))[op] for i in runs]
    n = [json.load(open(f"{res}/nearfs-meta-{i}.json"))[op] for i in runs]
    rows.append((f"{op} (5000 files)", "ops/s", e, n))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
machine = (f"{os.cpu_count()} × {cpu}, {int(mem)//2**20} GiB RAM, Linux {platform.release()}; "
           f"loop devices of {size} over sparse files in {os.environ.get('BENCH_DIR', '?')}; fio psync, 1 job, file {fsize}, "
           f"random jobs {runtime} s; median of {repeat} runs; "
           f"nearfs mounted with {os.environ.get('NEARFS_OPTS') or 'its defaults'}; {datetime.date.today()}")
table = ["| workload | unit | ext4 median (range) | nearfs median (range) | nearfs / ext4 |",
         "|---|---|---:|---:|---:|"]
def cell(v):
    return f"{statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f})"
for label, unit, e, n in rows:
    ratio = statistics.median(n) / statistics.median(e)
    table.append(f"| {label} | {unit} | {cell(e)} | {cell(n)} | {ratio:.0%} |")
block = "\n".join(["<!-- bench-fs:begin -->", f"Machine: {machine}", "", *table, "<!-- bench-fs:end -->"])
print(block)
text = open(out).read() if os.path.exists(out) else ""
if "<!-- bench-fs:begin -->" in text:
    head, rest = text.split("<!-- bench-fs:begin -->", 1)
    text = head + block + rest.split("<!-- bench-fs:end -->", 1)[1]
else:
    text = text + ("\n" if text else "") + block + "\n"
open(out, "w").write(text)
PY
