#!/usr/bin/env bash
# Every test: unit and component tests, FUSE integration tests (root and /dev/fuse needed),
# the pjdfstest POSIX suite against a mount, and the benchmarks in quick mode (a smoke run
# that checks every benchmark works and gets right answers). Prints each runner's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

install_packages
enable_fuse_uring
echo "==> building, formatting and lints"
cargo build --workspace --quiet
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
install_mount_helper target/debug/nearfs
echo "==> unit, component and integration tests"
status=0
cargo test --workspace --no-fail-fast >/tmp/nearfs-cargo-test.log 2>&1 || status=$?
grep -E '^(     Running|test result|test .* FAILED)' /tmp/nearfs-cargo-test.log || true
if [ "$status" -ne 0 ]; then
    echo "cargo test failed; the failures (full log: /tmp/nearfs-cargo-test.log):" >&2
    grep -A30 -- '^---- ' /tmp/nearfs-cargo-test.log | head -300 >&2 || true
    exit "$status"
fi
echo "==> pjdfstest (POSIX conformance)"
pjd_rc=0
scripts/pjdfstest.sh target/debug/nearfs | tee /tmp/nearfs-pjdfstest.log || pjd_rc=$?
echo "==> benchmarks, quick mode (checks that they work and give right answers, not speed)"
bench_rc=0
scripts/bench.sh --quick >/tmp/nearfs-bench.log 2>&1 || bench_rc=$?
grep -E '^(==>|nearfs-bench:)' /tmp/nearfs-bench.log || true

# One closing line over every runner.
read -r cp cf ci < <(awk '/^test result:/ { p += $4; f += $6; i += $8 } END { print p + 0, f + 0, i + 0 }' /tmp/nearfs-cargo-test.log)
read -r pp pf ps < <(sed -n 's/^pjdfstest: \([0-9]*\) passed, \([0-9]*\) failed, \([0-9]*\) skipped$/\1 \2 \3/p' /tmp/nearfs-pjdfstest.log | tail -1)
bp=$((bench_rc == 0)) bf=$((bench_rc != 0))
echo "total: $((cp + ${pp:-0} + bp)) passed, $((cf + ${pf:-0} + bf)) failed, $((ci + ${ps:-0})) skipped"
[ "$pjd_rc" -ne 0 ] && exit "$pjd_rc"
exit "$bench_rc"
