#!/usr/bin/env bash
# nearfs vs ext4 with fio: sequential 1 MiB read/write, 4 KiB random read/write, and
# metadata operations per second. Both filesystems sit on a loop device of the same size
# over sparse files in the same directory, so they share the same backing storage.
# Caches are dropped before every read job. Needs root.
#
#   scripts/bench-fs.sh [--size 4G] [--file-size 1G] [--runtime 20] [--out docs/benchmarks.md]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

SIZE=4G FILE_SIZE=1G RUNTIME=20 OUT=docs/benchmarks.md
while [ $# -gt 0 ]; do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --file-size) FILE_SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

install_packages
cargo build --release --quiet
NEARFS=$PWD/target/release/nearfs

work=$(mktemp -d /var/tmp/nearfs-bench.XXXXXX)
loops=()
cleanup() {
    for m in "$work/ext4" "$work/nearfs"; do mountpoint -q "$m" && umount "$m"; done
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ext4" "$work/nearfs" "$work/results"

loop_for() {
    truncate -s "$SIZE" "$1"
    local dev
    dev=$(losetup -f --show "$1")
    loops+=("$dev")
    echo "$dev"
}
ext4_dev=$(loop_for "$work/ext4.img")
nearfs_dev=$(loop_for "$work/nearfs.img")
mkfs.ext4 -q -F "$ext4_dev"
mount "$ext4_dev" "$work/ext4"
"$NEARFS" mkfs "$nearfs_dev" --force >/dev/null
"$NEARFS" mount "$nearfs_dev" "$work/nearfs"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# fio_job FS NAME RW BS [extra fio args]
fio_job() {
    local fs=$1 name=$2 rw=$3 bs=$4
    shift 4
    case $rw in *read*) drop_caches ;; esac
    fio --name="$name" --directory="$work/$fs" --filename=bench.dat --size="$FILE_SIZE" \
        --rw="$rw" --bs="$bs" --ioengine=psync --numjobs=1 --group_reporting \
        --output-format=json "$@" >"$work/results/$fs-$name.json"
}

for fs in ext4 nearfs; do
    echo "==> $fs"
    fio_job "$fs" seqwrite write 1M --end_fsync=1
    fio_job "$fs" seqread read 1M
    fio_job "$fs" randread randread 4k --runtime="$RUNTIME" --time_based
    fio_job "$fs" randwrite randwrite 4k --runtime="$RUNTIME" --time_based --end_fsync=1
    python3 - "$work/$fs/meta" >"$work/results/$fs-meta.json" <<'PY'
import json, os, sys, time
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
print(json.dumps(res))
PY
done

python3 - "$work/results" "$OUT" "$SIZE" "$FILE_SIZE" "$RUNTIME" <<'PY'
import json, os, platform, subprocess, sys, datetime
res, out, size, fsize, runtime = sys.argv[1:]
def fio(fs, name, what):
    j = json.load(open(f"{res}/{fs}-{name}.json"))["jobs"][0]
    side = j["read"] if "read" in name else j["write"]
    return side["bw_bytes"] / 2**20 if what == "MiB/s" else side["iops"]
rows = []
for name, label, what in [("seqwrite", "sequential write 1 MiB", "MiB/s"),
                          ("seqread", "sequential read 1 MiB (cold cache)", "MiB/s"),
                          ("randread", "random read 4 KiB (cold cache)", "IOPS"),
                          ("randwrite", "random write 4 KiB", "IOPS")]:
    e, n = fio("ext4", name, what), fio("nearfs", name, what)
    rows.append((label, what, e, n))
for op in ["create", "stat", "rename", "unlink"]:
    e = json.load(open(f"{res}/ext4-meta.json"))[op]
    n = json.load(open(f"{res}/nearfs-meta.json"))[op]
    rows.append((f"{op} (5000 files)", "ops/s", e, n))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
machine = (f"{os.cpu_count()} × {cpu}, {int(mem)//2**20} GiB RAM, Linux {platform.release()}; "
           f"loop devices of {size} over sparse files in /var/tmp; fio psync, 1 job, file {fsize}, "
           f"random jobs {runtime} s; {datetime.date.today()}")
table = ["| workload | unit | ext4 | nearfs | nearfs / ext4 |", "|---|---|---:|---:|---:|"]
for label, unit, e, n in rows:
    table.append(f"| {label} | {unit} | {e:,.0f} | {n:,.0f} | {n / e:.0%} |")
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
