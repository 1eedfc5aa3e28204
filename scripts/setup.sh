#!/usr/bin/env bash
# One command on a fresh Debian machine: install what nearfs needs, build it, install the
# `nearfs` command and its mount helper, and run the main job on an image file.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

install_packages
enable_fuse_uring
echo "==> building nearfs (release)"
cargo build --release --quiet
install_mount_helper target/release/nearfs
# The demo shows the installed command, as a user would type it.
exec scripts/demo.sh "$(command -v nearfs || echo target/release/nearfs)"
