//! Helpers for the integration tests: a nearfs image mounted through FUSE in a temporary
//! directory, unmounted (and its daemon reaped) on drop, also when a test fails.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `nearfs` binary built next to this test binary (or `$NEARFS_BIN`).
pub fn nearfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NEARFS_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("nearfs");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build` first",
        bin.display()
    );
    bin
}

/// Runs `nearfs ARGS` to completion.
pub fn nearfs(args: &[&str]) -> Output {
    Command::new(nearfs_bin())
        .args(args)
        .output()
        .expect("run nearfs")
}

/// Asserts that a finished command succeeded, showing what it printed on stderr if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary directory holding a freshly made image `d.img` of `size` and an empty
/// mountpoint `m`, for tests that mount by other means than [`TestFs`].
pub fn made_image(size: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, mnt) = (dir.path().join("d.img"), dir.path().join("m"));
    std::fs::create_dir(&mnt).expect("mountpoint");
    assert_ok(&nearfs(&[
        "mkfs",
        image.to_str().expect("utf-8 path"),
        "--size",
        size,
    ]));
    (dir, image, mnt)
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

/// A mounted nearfs filesystem in a temporary directory.
pub struct TestFs {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub mnt: PathBuf,
    daemon: Option<Child>,
}

impl TestFs {
    /// mkfs an image of `size` (e.g. "64M") and mount it with `-o options`.
    pub fn new(size: &str, options: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nearfs-test")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("disk.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let out = nearfs(&["mkfs", image.to_str().expect("utf-8 path"), "--size", size]);
        assert!(
            out.status.success(),
            "mkfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut fs = Self {
            dir,
            image,
            mnt,
            daemon: None,
        };
        fs.mount(options);
        fs
    }

    /// Mounts the image in the foreground as a child process, waiting until it is ready.
    pub fn mount(&mut self, options: &str) {
        assert!(self.daemon.is_none(), "already mounted");
        // A world-searchable path, so that other users can reach the mount.
        let _ = Command::new("chmod")
            .arg("755")
            .arg(self.dir.path())
            .status();
        let mut cmd = Command::new(nearfs_bin());
        cmd.arg("mount")
            .arg(&self.image)
            .arg(&self.mnt)
            .arg("--foreground");
        if !options.is_empty() {
            cmd.arg("-o").arg(options);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nearfs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().expect("output");
                panic!(
                    "nearfs exited ({status}) before mounting: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    /// Unmounts and waits for the daemon to finish its final commit.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        if let Some(mut err) = child.stderr.take() {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            if s.contains("panicked") {
                panic!("the daemon panicked: {s}");
            }
        }
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Reads an extended attribute; Err carries the errno.
pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: both strings are NUL-terminated and buf is valid for buf.len() bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Sets an extended attribute; Err carries the errno.
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    // SAFETY: both strings are NUL-terminated and value is valid for value.len() bytes.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// Names of the extended attributes of `path`.
pub fn listxattr(path: &Path) -> Vec<String> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: the path is NUL-terminated and buf is valid for buf.len() bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf[..r as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Runs a shell command as another user (and supplementary groups) via setpriv.
pub fn sh_as(uid: u32, gid: u32, groups: &[u32], script: &str) -> Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={gid}"), groups])
        .args(["sh", "-c", script])
        .output()
        .expect("setpriv")
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The repository's `bpf-progs/`.
pub fn progs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf-progs")
}

/// Compiles appcode C into `dir` with `clang -O2 -g -target bpf -mcpu=v3`; returns the
/// object's path.
pub fn compile_bpf(source: &Path, dir: &Path) -> PathBuf {
    let object = dir.join(source.file_stem().unwrap()).with_extension("o");
    let out = std::process::Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-c", "-I"])
        .arg(progs_dir().join("include"))
        .arg(source)
        .arg("-o")
        .arg(&object)
        .output()
        .expect("clang is needed (scripts/setup.sh installs it)");
    assert_ok(&out);
    object
}

/// A copy of the nearfs binary that any user can run (the build directory may not be
/// reachable for them), in `dir`.
pub fn nearfs_for_everyone(dir: &Path) -> PathBuf {
    let to = dir.join("nearfs");
    if !to.exists() {
        std::fs::copy(nearfs_bin(), &to).expect("copy nearfs");
    }
    to
}

/// The errno of an offload client error, if it is one.
pub fn client_errno(e: &nearfs_client::Error) -> Option<i32> {
    match e {
        nearfs_client::Error::Io(io) => io.raw_os_error(),
        _ => None,
    }
}
