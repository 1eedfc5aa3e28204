#!/usr/bin/env bash
# The main job on the embedded default: mkfs a sparse image file, mount it, write and read
# back files, show where their extents are, run appcode next to the data (lookups and a
# filter, against ordinary reads), unmount, and check the image.
set -euo pipefail
NEARFS=${1:-nearfs}
work=${NEARFS_DEMO_DIR:-$(mktemp -d /tmp/nearfs-demo.XXXXXX)}
image="$work/disk.img"
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() { mountpoint -q "$mnt" && umount "$mnt" || true; }
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$NEARFS" mkfs "$image" --size 4G --force
step ls -ls "$image"
step "$NEARFS" mount "$image" "$mnt"
step sh -c "head -c 64M /dev/urandom > '$mnt/data.bin'"
step sh -c "echo 'hello from nearfs' > '$mnt/hello.txt'"
step mkdir -p "$mnt/docs"
step cp "$0" "$mnt/docs/demo.sh"
step cat "$mnt/hello.txt"
step ls -l "$mnt" "$mnt/docs"
step getfattr -d -m - "$mnt/data.bin" "$mnt/hello.txt"
step getfattr -n user.nearfs.fs "$mnt"
step "$NEARFS" demo "$mnt"
step getfattr -n user.nearfs.stats "$mnt/demo-tree.db"
sum=$(sha256sum < "$mnt/data.bin")
step umount "$mnt"
step "$NEARFS" fsck "$image"
step "$NEARFS" mount "$image" "$mnt" -o ro
if [ "$(sha256sum < "$mnt/data.bin")" = "$sum" ]; then
    echo "data.bin read back after remount: checksums match"
else
    echo "data.bin changed across remount!" >&2
    exit 1
fi
step umount "$mnt"
step "$NEARFS" info "$image"
echo
echo "The image is $image; mount it again with: $NEARFS mount $image $mnt"
