#!/usr/bin/env bash
# The pjdfstest POSIX suite against a nearfs mount (root needed: it switches users).
# Pass 1 runs everything but the EROFS cases; pass 2 runs those on a fresh mount, where
# `mount -o remount,ro` can succeed. Exceptions and their reasons: docs/posix.md.
set -euo pipefail
cd "$(dirname "$0")/.."
NEARFS=$(realpath "${1:-target/debug/nearfs}")
PJD=${PJDFSTEST:-$(command -v pjdfstest || true)}
if [ -z "$PJD" ]; then
    echo "==> installing pjdfstest (cargo install, once)"
    cargo install pjdfstest --locked --quiet
    PJD=${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest
fi

work=$(mktemp -d /tmp/nearfs-pjdfstest.XXXXXX)
chmod 755 "$work"
mnt=$work/mnt
mkdir -p "$mnt" "$work/second"
chmod 777 "$work/second"
cleanup() {
    if mountpoint -q "$mnt"; then umount "$mnt" || umount -l "$mnt"; fi
    rm -rf "$work"
}
trap cleanup EXIT

# run_pass NAME CONFIG [PATTERN...]: fresh filesystem, one pjdfstest run, fsck afterwards.
run_pass() {
    local name=$1 config=$2
    shift 2
    "$NEARFS" mkfs "$work/disk.img" --size 1G --force >/dev/null
    "$NEARFS" mount "$work/disk.img" "$mnt" -o allow_other
    mkdir "$mnt/w" && chmod 777 "$mnt/w"
    local rc=0
    (cd /tmp && "$PJD" -c "$config" -p "$mnt/w" -s "$work/second" "$@") >"$work/$name.log" 2>&1 || rc=$?
    grep -vE '[[:space:]]ok$|erofs.*skipped|allow_remount' "$work/$name.log" | grep -vE '^\s*$' || true
    umount "$mnt"
    "$NEARFS" fsck "$work/disk.img" >/dev/null || { echo "fsck failed after pjdfstest $name" >&2; rc=1; }
    return $rc
}

rc=0
run_pass main "$PWD/scripts/pjdfstest.toml" || rc=$?
sed 's/^allow_remount = false/allow_remount = true/' scripts/pjdfstest.toml >"$work/erofs.toml"
run_pass erofs "$work/erofs.toml" erofs || rc=$?

# One summary over both passes (EROFS cases skipped in pass 1 are counted in pass 2).
read -r passed failed skipped < <(awk '
    /^Summary:/ { for (i = 2; i < NF; i++) v[$(i+1)] += $i }
    END { print v["passed,"] + 0, v["failed,"] + 0, v["skipped,"] + 0 }' "$work/main.log" "$work/erofs.log")
erofs=$(grep -c 'erofs.*ok$' "$work/erofs.log" || true)
skipped=$((skipped - erofs))
echo "pjdfstest: $passed passed, $failed failed, $skipped skipped"
exit $rc
