//! Helpers for the integration tests: a nearfs image mounted through FUSE in a temporary
//! directory, unmounted (and its daemon reaped) on drop, also when a test fails; and NBD
//! servers (`nearfs serve`, qemu-nbd, nbdkit) on loopback ports, killed on drop.

use std::ffi::CString;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
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
    /// The image file, or the `nbd://` URL of the export the filesystem is mounted from.
    pub image: PathBuf,
    pub mnt: PathBuf,
    daemon: Option<Child>,
    /// Where the daemon's stderr goes, and how long it was when the current mount began.
    /// A file rather than a pipe: a daemon that logs many errors (a target gone away)
    /// must never block on a pipe nobody reads.
    log: PathBuf,
    log_from: u64,
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
        let log = dir.path().join("daemon.log");
        let mut fs = Self {
            dir,
            image,
            mnt,
            daemon: None,
            log,
            log_from: 0,
        };
        fs.mount(options);
        fs
    }

    /// Mounts the filesystem on the NBD export at `url` (made with `nearfs mkfs` and
    /// served by an [`NbdTarget`]) with `-o options`.
    pub fn over_nbd(url: &str, options: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nearfs-test")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let log = dir.path().join("daemon.log");
        let mut fs = Self {
            dir,
            image: PathBuf::from(url),
            mnt,
            daemon: None,
            log,
            log_from: 0,
        };
        fs.mount(options);
        fs
    }

    /// What the daemon of the current (or last) mount logged.
    pub fn daemon_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(self.log_from));
            let _ = f.read_to_string(&mut s);
        }
        s
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        self.log_from = log.metadata().map_or(0, |m| m.len());
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nearfs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nearfs exited ({status}) before mounting: {}",
                    self.daemon_log()
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
        let s = self.daemon_log();
        if s.contains("panicked") {
            panic!("the daemon panicked: {s}");
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

/// The NBD servers nearfs is tested with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdServer {
    /// `nearfs serve`: plain NBD, and appcode at the target for nearfs mounts.
    Nearfs,
    /// QEMU's server (`qemu-nbd`), raw format.
    QemuNbd,
    /// `nbdkit` with its file plugin.
    Nbdkit,
}

/// An NBD server exporting an image on a loopback port, as a child process that is
/// killed (and reaped) on drop, also when a test fails.
pub struct NbdTarget {
    pub server: NbdServer,
    pub image: PathBuf,
    pub port: u16,
    /// Extra arguments for the server (e.g. `--read-only`).
    args: Vec<String>,
    /// The server's stdout and stderr, next to the image.
    pub log: PathBuf,
    child: Option<Child>,
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl NbdTarget {
    /// The name of the export every server offers (nbdkit's file plugin answers to any).
    pub const EXPORT: &str = "disk";

    /// Starts `server` on `image` and waits until it speaks NBD.
    pub fn start(server: NbdServer, image: &Path, args: &[&str]) -> Self {
        let dir = image.parent().expect("image in a directory");
        let mut target = NbdTarget {
            server,
            image: image.to_owned(),
            port: 0,
            args: args.iter().map(|a| a.to_string()).collect(),
            log: dir.join(format!("{server:?}.log").to_lowercase()),
            child: None,
        };
        // Another process may take the free port before the server binds it: then the
        // server exits, and it tries another.
        let mut failures = Vec::new();
        for _ in 0..5 {
            target.port = free_port();
            match target.spawn() {
                Ok(child) => {
                    target.child = Some(child);
                    return target;
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("{server:?} did not start: {failures:#?}");
    }

    /// `nbd://127.0.0.1:PORT/disk`.
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, Self::EXPORT)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the server printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let image = &self.image;
        let port = self.port.to_string();
        let mut cmd = match self.server {
            NbdServer::Nearfs => {
                let mut c = Command::new(nearfs_bin());
                c.arg("serve")
                    .arg(image)
                    .args(["--listen", &format!("127.0.0.1:{port}")])
                    .args(["--export", Self::EXPORT])
                    .args(&self.args);
                c
            }
            NbdServer::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                // -t: keep serving after the last client leaves; --shared: the mount's
                // connections, the tools' and the readiness probe's at once.
                c.args([
                    "-f",
                    "raw",
                    "-x",
                    Self::EXPORT,
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port,
                ])
                .args(["--shared=16", "-t"])
                .args(&self.args)
                .arg(image);
                c
            }
            NbdServer::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args(["-f", "-i", "127.0.0.1", "-p", &port])
                    .args(&self.args)
                    .arg("file")
                    .arg(image);
                c
            }
        };
        // SAFETY: the closure runs in the child between fork and exec and makes one
        // async-signal-safe system call, touching no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // The server dies with the test, whatever ends it (the kernel sends the
                // signal when the thread that started it ends).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts the server on `self.port`, returning once it greets clients.
    fn spawn(&self) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", self.server))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{:?} exited ({status}) on port {}: {}",
                    self.server,
                    self.port,
                    self.log()
                ));
            }
            if greets(addr) {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{:?} did not answer on port {} within 60 s: {}",
                    self.server,
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the server to stop (SIGTERM) and waits for it; kills it if it does not go.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill takes a pid and a signal number; the child is ours and not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends `signal` to the running server (SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill takes a pid and a signal number; the child is ours and not reaped.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Starts the server again on the same image and port (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        // The port is free again once the old server is reaped; a few tries in case the
        // kernel is slow to let go of it.
        let mut failures = Vec::new();
        for _ in 0..10 {
            match self.spawn() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => failures.push(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{:?} did not restart: {failures:#?}", self.server);
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether an NBD server on `addr` greets a new client (newstyle: "NBDMAGIC" first).
fn greets(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
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
