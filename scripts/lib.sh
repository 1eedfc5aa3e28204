# Shared by the scripts: installing what a fresh Debian machine lacks, and the mount helper.

# Debian packages nearfs needs: FUSE, clang/llvm (appcode), attr (getfattr), fio (benchmarks),
# libacl1-dev (pjdfstest), util-linux (setpriv), e2fsprogs (ext4 for comparisons),
# fonts-dejavu-core (text in the benchmark plots), qemu-utils (qemu-nbd, qemu-io),
# libnbd-bin (nbdinfo, nbdcopy) and nbdkit (NBD interop tests).
NEARFS_PACKAGES="fuse3 clang llvm attr fio libacl1-dev util-linux e2fsprogs fonts-dejavu-core qemu-utils libnbd-bin nbdkit"

install_packages() {
    local missing=()
    for p in $NEARFS_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Makes `mount -t fuse.nearfs IMAGE DIR` and fstab lines use the given nearfs binary.
install_mount_helper() {
    local bin
    bin=$(realpath "$1")
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo ln -sf "$bin" /sbin/mount.fuse.nearfs
    $sudo ln -sf "$bin" /usr/local/bin/nearfs
}

# Lets FUSE filesystems serve requests over io_uring (Linux 6.14+; off by default in the
# kernel). nearfs uses it when the kernel offers it (docs/fuse.md); without it, nearfs
# serves /dev/fuse as before. A no-op on kernels without the parameter.
enable_fuse_uring() {
    local knob=/sys/module/fuse/parameters/enable_uring
    [ -w "$knob" ] || return 0
    [ "$(cat "$knob")" = Y ] && return 0
    echo "==> enabling FUSE over io_uring ($knob)"
    echo 1 >"$knob"
}
