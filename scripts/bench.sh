#!/usr/bin/env bash
# Offload against every alternative: dependent lookups, scans, read-modify-write and the
# runtime's overheads, measured side by side in one run (bench/, `nearfs-bench`); then
# remote offload over NBD (seed 002's Figure 1) and plain block service against qemu-nbd
# and nbdkit. Builds release binaries, makes its own images and data under --work, and
# writes results.json, PNG plots and Markdown tables.
#
#   scripts/bench.sh            # full (about 11 minutes): docs/bench/ and the tables in docs/benchmarks.md
#   scripts/bench.sh --quick    # smoke run (about a minute) into a temporary directory; CI runs it
#   scripts/bench.sh --only remote   # one section (local or remote); the other's saved results are kept
#   scripts/bench.sh [--quick] [--only SECTION] [--out DIR] [--docs FILE] [--work DIR]
#   target/release/nearfs-bench --replot docs/bench/results.json --out docs/bench --docs docs/benchmarks.md
#                               # draws the plots and tables again from saved results
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

quick=0 out="" docs="" work=/var/tmp only=""
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1; shift ;;
        --out) out=$2; shift 2 ;;
        --docs) docs=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

install_packages
enable_fuse_uring
cargo build --release --quiet -p nearfs -p nearfs-bench
args=(--work "$work")
[ -n "$only" ] && args+=(--only "$only")
if [ "$quick" -eq 1 ]; then
    args+=(--quick)
    if [ -z "$out" ]; then
        out=$(mktemp -d /tmp/nearfs-bench-quick.XXXXXX)
        trap 'rm -rf "$out"' EXIT
    fi
else
    out=${out:-docs/bench}
    docs=${docs:-docs/benchmarks.md}
fi
args+=(--out "$out")
[ -n "$docs" ] && args+=(--docs "$docs")
target/release/nearfs-bench "${args[@]}" | tee "$out/tables.md"
if [ "$quick" -eq 1 ]; then
    # The results must be enough to draw everything again (`--replot`), identically.
    target/release/nearfs-bench --replot "$out/results.json" --out "$out" >"$out/replot.md"
    cmp "$out/tables.md" "$out/replot.md"
fi
