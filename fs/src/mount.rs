//! Mounting: option parsing, daemonizing, the FUSE session, periodic commits, and a
//! clean stop on unmount or signal.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blockdev::{BlockDevice, FileDevice, LatencyDevice, OpenOptions};
use extents::{Fs, MountOptions};

use crate::daemon::{self, NearFs};
use crate::fuse::{InitConfig, Session};
use crate::offload::{Offload, Policy, Settings};

/// Environment variable through which a daemonized child learns its readiness pipe.
const READY_FD_ENV: &str = "NEARFS_READY_FD";
/// How long a mount waits for a previous daemon of the same image to finish.
const LOCK_WAIT: Duration = Duration::from_secs(15);

/// A kernel mount flag given as an option, set or cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountOption {
    NoDev,
    Dev,
    NoSuid,
    Suid,
    NoExec,
    Exec,
    NoAtime,
    Atime,
}

impl MountOption {
    fn parse(name: &str) -> Option<MountOption> {
        use MountOption::*;
        [NoDev, Dev, NoSuid, Suid, NoExec, Exec, NoAtime, Atime]
            .into_iter()
            .find(|o| o.as_str() == name)
    }

    fn as_str(self) -> &'static str {
        match self {
            MountOption::NoDev => "nodev",
            MountOption::Dev => "dev",
            MountOption::NoSuid => "nosuid",
            MountOption::Suid => "suid",
            MountOption::NoExec => "noexec",
            MountOption::Exec => "exec",
            MountOption::NoAtime => "noatime",
            MountOption::Atime => "atime",
        }
    }
}

/// Everything `nearfs mount` needs to know.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub read_only: bool,
    /// Open the device with O_DIRECT.
    pub direct: bool,
    /// Seconds between background commits.
    pub commit_secs: u64,
    /// FUSE worker threads (per CPU over io_uring).
    pub threads: usize,
    /// Serve requests over io_uring when the kernel offers it (`uring`; `nouring`, the
    /// default, reads `/dev/fuse`; docs/fuse.md says when each is faster).
    pub uring: bool,
    /// Kernel mount flags passed through (nodev, noexec, ...).
    pub passthrough: Vec<MountOption>,
    /// Where a daemonized mount writes its log (otherwise it is discarded).
    pub log: Option<PathBuf>,
    /// Log verbosity (-v count), handed on to a daemonized child.
    pub verbose: u8,
    /// What appcode may do on this mount and how much of it each user may have
    /// (`offload=off|ro|rw`, `offload_runs=N`, `offload_programs=N`, `offload_bytes=SIZE`;
    /// the workers are as many as `threads`).
    pub offload: Settings,
    /// Added to every device read and write (`latency=USEC`), to emulate slower media in
    /// benchmarks.
    pub latency: Duration,
    /// On a mount over NBD: added to every round trip (`nbd_delay=USEC`), as a network
    /// farther away would; connections at most (`nbd_connections=N`); how long a request
    /// may take before it fails with EIO (`nbd_timeout=SECS`).
    pub nbd_delay: Duration,
    pub nbd_connections: usize,
    pub nbd_timeout: Duration,
}

impl MountConfig {
    pub fn new(image: PathBuf, mountpoint: PathBuf) -> Self {
        Self {
            image,
            mountpoint,
            foreground: false,
            allow_other: false,
            default_permissions: false,
            read_only: false,
            direct: false,
            commit_secs: 5,
            threads: 4,
            uring: false,
            passthrough: Vec::new(),
            log: None,
            verbose: 0,
            offload: Settings::default(),
            latency: Duration::ZERO,
            nbd_delay: Duration::ZERO,
            nbd_connections: nbd::Options::default().connections,
            nbd_timeout: nbd::Options::default().timeout,
        }
    }

    /// Applies a `-o a,b,c=d` option list (as `mount -o` and fstab give it).
    pub fn apply_options(&mut self, list: &str) -> Result<()> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, value) {
                ("allow_other", None) => self.allow_other = true,
                ("default_permissions", None) => self.default_permissions = true,
                ("ro", None) => self.read_only = true,
                ("rw", None) => self.read_only = false,
                ("direct", None) => self.direct = true,
                ("uring", None) => self.uring = true,
                ("nouring", None) => self.uring = false,
                ("commit", Some(v)) => {
                    self.commit_secs = v
                        .parse()
                        .ok()
                        .filter(|&s| s > 0)
                        .context("commit=SECONDS (> 0)")?
                }
                ("threads", Some(v)) => {
                    self.threads = v
                        .parse()
                        .ok()
                        .filter(|&t| (1..=64).contains(&t))
                        .context("threads=1..64")?;
                    self.offload.workers = self.threads
                }
                ("log", Some(v)) if !v.is_empty() => self.log = Some(v.into()),
                ("offload", Some(v)) => {
                    self.offload.policy = Policy::parse(v).context("offload=off|ro|rw")?
                }
                ("offload_runs", Some(v)) => {
                    self.offload.runs_per_user = v
                        .parse()
                        .ok()
                        .filter(|&n| (1..=1024).contains(&n))
                        .context("offload_runs=1..1024")?
                }
                ("offload_programs", Some(v)) => {
                    self.offload.programs_per_user = v
                        .parse()
                        .ok()
                        .filter(|&n| (1..=1 << 20).contains(&n))
                        .context("offload_programs=1..1048576")?
                }
                ("offload_bytes", Some(v)) => {
                    self.offload.bytes_per_user = crate::commands::parse_size(v)
                        .ok()
                        .filter(|&n| n >= 1 << 20)
                        .context("offload_bytes=SIZE (at least 1M; K, M, G suffixes)")?
                }
                ("latency", Some(v)) => {
                    self.latency = v
                        .parse()
                        .ok()
                        .filter(|&us| us <= 1_000_000)
                        .map(Duration::from_micros)
                        .context("latency=MICROSECONDS (0..1000000)")?
                }
                ("nbd_delay", Some(v)) => {
                    self.nbd_delay = v
                        .parse()
                        .ok()
                        .filter(|&us| us <= 1_000_000)
                        .map(Duration::from_micros)
                        .context("nbd_delay=MICROSECONDS (0..1000000)")?
                }
                ("nbd_connections", Some(v)) => {
                    self.nbd_connections = v
                        .parse()
                        .ok()
                        .filter(|&n| (1..=64).contains(&n))
                        .context("nbd_connections=1..64")?
                }
                ("nbd_timeout", Some(v)) => {
                    self.nbd_timeout = v
                        .parse()
                        .ok()
                        .filter(|&s| (1..=3600).contains(&s))
                        .map(Duration::from_secs)
                        .context("nbd_timeout=SECONDS (1..3600)")?
                }
                (k, None) if MountOption::parse(k).is_some() => {
                    self.passthrough.extend(MountOption::parse(k))
                }
                // Options mount(8) and fstab use that mean nothing to the filesystem.
                (
                    "defaults" | "auto" | "noauto" | "nofail" | "user" | "users" | "nouser"
                    | "_netdev" | "relatime" | "norelatime",
                    None,
                ) => {}
                (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
                _ => bail!("unknown mount option {opt:?}"),
            }
        }
        Ok(())
    }
}

/// The NBD URL a device argument names, if it is one (`nbd://HOST[:PORT]/EXPORT`).
pub fn nbd_url(path: &Path) -> Option<Result<nbd::NbdUrl>> {
    let url = nbd::NbdUrl::parse(path.to_str()?)?;
    Some(url.map_err(|e| anyhow::anyhow!(e)))
}

/// Connects to an NBD export; with `owner`, asks for the appcode extension and claims the
/// export for that mount.
pub fn connect_nbd(url: &nbd::NbdUrl, options: nbd::Options) -> Result<Arc<nbd::NbdDevice>> {
    Ok(Arc::new(
        nbd::NbdDevice::connect(url, options)
            .with_context(|| format!("cannot connect to {url}"))?,
    ))
}

/// Opens an image, a block device or an NBD export for nearfs; images and devices are
/// locked against other nearfs processes.
pub fn open_device(path: &Path, read_only: bool, direct: bool) -> Result<Arc<dyn BlockDevice>> {
    if let Some(url) = nbd_url(path) {
        return Ok(connect_nbd(&url?, nbd::Options::default())?);
    }
    let dev = FileDevice::open(path, OpenOptions { direct, read_only })
        .with_context(|| format!("cannot open {}", path.display()))?;
    dev.lock_exclusive(LOCK_WAIT)?;
    Ok(Arc::new(dev))
}

/// Mounts, returning once the mount is ready. Unless `foreground`, the filesystem keeps
/// running in a detached child process; in the foreground this returns after unmount.
pub fn mount(cfg: &MountConfig) -> Result<()> {
    // Absolute paths: /proc/mounts shows them, and the daemon finds its mount by them.
    let mut cfg = cfg.clone();
    let mut paths = vec![&mut cfg.mountpoint];
    if nbd_url(&cfg.image).is_none() {
        paths.push(&mut cfg.image);
    }
    for p in paths {
        *p = std::fs::canonicalize(&*p).with_context(|| format!("cannot find {}", p.display()))?;
    }
    let cfg = &cfg;
    if cfg.foreground {
        return serve(cfg, ready_pipe_from_env());
    }
    let (read_end, write_end) = pipe()?;
    let exe = std::env::current_exe().context("cannot find the nearfs executable")?;
    let mut child = std::process::Command::new(exe);
    child
        .arg("mount")
        .arg(&cfg.image)
        .arg(&cfg.mountpoint)
        .arg("--foreground");
    child.arg("-o").arg(options_string(cfg));
    for _ in 0..cfg.verbose {
        child.arg("-v");
    }
    child.env(READY_FD_ENV, raw(&write_end).to_string());
    child.stdin(std::process::Stdio::null());
    let mut child = child.spawn().context("cannot start the nearfs daemon")?;
    drop(write_end);
    let mut answer = Vec::new();
    std::fs::File::from(read_end).read_to_end(&mut answer)?;
    if answer == b"ready" {
        return Ok(());
    }
    let status = child.wait()?;
    bail!("the nearfs daemon did not mount ({status})");
}

fn options_string(cfg: &MountConfig) -> String {
    let mut o = vec![
        format!("commit={}", cfg.commit_secs),
        format!("threads={}", cfg.threads),
        format!("offload={}", cfg.offload.policy.as_str()),
        format!("offload_runs={}", cfg.offload.runs_per_user),
        format!("offload_programs={}", cfg.offload.programs_per_user),
        format!("offload_bytes={}", cfg.offload.bytes_per_user),
        format!("latency={}", cfg.latency.as_micros()),
        format!("nbd_delay={}", cfg.nbd_delay.as_micros()),
        format!("nbd_connections={}", cfg.nbd_connections),
        format!("nbd_timeout={}", cfg.nbd_timeout.as_secs()),
    ];
    for (set, name) in [
        (cfg.allow_other, "allow_other"),
        (cfg.default_permissions, "default_permissions"),
        (cfg.read_only, "ro"),
        (cfg.direct, "direct"),
        (cfg.uring, "uring"),
    ] {
        if set {
            o.push(name.to_string());
        }
    }
    if let Some(log) = &cfg.log {
        o.push(format!("log={}", log.display()));
    }
    o.extend(cfg.passthrough.iter().map(|p| p.as_str().to_string()));
    o.join(",")
}

/// A number that tells this mount from any other: the pid, the time and the boot's
/// randomness, hashed.
fn mount_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() | 1
}

fn raw(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// A pipe whose read end is close-on-exec and whose write end is inherited.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array, which has room for both.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: both descriptors were just created by pipe and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((r, w))
}

/// The readiness pipe passed by a parent `nearfs mount`, if any.
fn ready_pipe_from_env() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent created this descriptor for us alone and does not use it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks the signals that stop the daemon in the calling thread (and every thread it
/// starts afterwards), so that one dedicated thread can wait for them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain bitmask; zeroed and then initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: every call receives a pointer to the valid sigset_t above.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Runs the filesystem until it is unmounted.
fn serve(cfg: &MountConfig, ready: Option<OwnedFd>) -> Result<()> {
    let daemonized = ready.is_some();
    if daemonized {
        // SAFETY: setsid has no arguments; failing (already a leader) is harmless.
        unsafe { libc::setsid() };
    }
    let target = match nbd_url(&cfg.image) {
        Some(url) => {
            let options = nbd::Options {
                connections: cfg.nbd_connections,
                delay: cfg.nbd_delay,
                timeout: cfg.nbd_timeout,
                // This mount's claim on the export: one mount owns it at a time.
                appcode: Some(mount_token()),
            };
            let target = connect_nbd(&url?, options)?;
            let at = extents::format::UUID_BYTES;
            target.pin(at.start, (at.end - at.start) as usize)?;
            Some(target)
        }
        None => None,
    };
    let mut dev: Arc<dyn BlockDevice> = match &target {
        Some(t) => t.clone(),
        None => open_device(&cfg.image, cfg.read_only, cfg.direct)?,
    };
    if !cfg.latency.is_zero() {
        dev = Arc::new(LatencyDevice::new(dev, cfg.latency));
    }
    let opts = MountOptions {
        read_only: cfg.read_only,
        kernel_refs: true,
    };
    let fs = Arc::new(
        Fs::mount(dev, opts).with_context(|| format!("cannot mount {}", cfg.image.display()))?,
    );

    let signals = block_stop_signals();
    let offload = Arc::new(Offload::new(fs.clone(), cfg.offload, target));
    let (session, unmount) = start_session(cfg)?;
    offload.set_notifier(session.notifier())?;
    tracing::info!(io_uring = session.over_uring(), "FUSE session started");
    std::thread::Builder::new()
        .name("nearfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait reads the set and writes the signal number into `sig`.
            unsafe { libc::sigwait(&signals, &mut sig) };
            tracing::info!(signal = sig, "unmounting on signal");
            unmount.unmount();
        })?;

    let stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let (fs, stop, every) = (
            fs.clone(),
            stop.clone(),
            Duration::from_secs(cfg.commit_secs),
        );
        std::thread::Builder::new()
            .name("nearfs-commit".into())
            .spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        if fs.is_dirty()
                            && let Err(e) = fs.commit()
                        {
                            tracing::error!(error = %e, "background commit failed");
                        }
                    }
                }
            })?
    };

    raise_readahead(&cfg.mountpoint);
    tracing::info!(image = %cfg.image.display(), mountpoint = %cfg.mountpoint.display(), "mounted");
    if let Some(fd) = ready {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(b"ready");
        drop(f);
        detach_stdio(cfg.log.as_deref());
    }
    let result = {
        let over_uring = session.over_uring();
        session.run(Arc::new(NearFs::new(fs.clone(), offload, over_uring)))
    };
    stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    fs.commit().context("final commit failed")?;
    tracing::info!("unmounted; everything committed");
    result.context("FUSE session failed")
}

/// How to take the mount down again.
enum Unmount {
    /// We mounted it with mount(2).
    Kernel(PathBuf),
    /// fusermount3 mounted it for us.
    Fusermount(PathBuf),
}

impl Unmount {
    fn unmount(&self) {
        let result = match self {
            Unmount::Kernel(path) => umount(path),
            Unmount::Fusermount(path) => std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(path)
                .status()
                .and_then(|s| {
                    s.success()
                        .then_some(())
                        .ok_or_else(|| std::io::Error::other(format!("fusermount3 -u: {s}")))
                }),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "unmount failed");
        }
    }
}

fn cstring(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Unmounts `path`, detaching it lazily if it is busy.
fn umount(path: &Path) -> std::io::Result<()> {
    let target = cstring(path)?;
    // SAFETY: target is a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
}

/// Kernel mount flags for the configured options (nosuid and nodev unless asked for).
fn mount_flags(cfg: &MountConfig) -> libc::c_ulong {
    let mut flags = 0;
    let has = |o: &MountOption| cfg.passthrough.contains(o);
    if !has(&MountOption::Suid) {
        flags |= libc::MS_NOSUID;
    }
    if !has(&MountOption::Dev) {
        flags |= libc::MS_NODEV;
    }
    if has(&MountOption::NoExec) {
        flags |= libc::MS_NOEXEC;
    }
    if has(&MountOption::NoAtime) {
        flags |= libc::MS_NOATIME;
    }
    if cfg.read_only {
        flags |= libc::MS_RDONLY;
    }
    flags
}

/// Mounts /dev/fuse on the mountpoint as type `fuse.nearfs`, as libfuse does for root (a
/// plain `fuse` mount is one that `mount -o remount` and `df -t` cannot tell apart from
/// other FUSE filesystems).
fn kernel_mount(cfg: &MountConfig) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid}",
        dev.as_raw_fd()
    );
    if cfg.allow_other {
        data.push_str(",allow_other");
    }
    if cfg.default_permissions {
        data.push_str(",default_permissions");
    }
    let source = cstring(&cfg.image)?;
    let target = cstring(&cfg.mountpoint)?;
    let data = std::ffi::CString::new(data).expect("no NUL in options");
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse.nearfs".as_ptr(),
            mount_flags(cfg),
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev.into())
}

/// Mounts through the setuid `fusermount3`, as libfuse does for users other than root: it
/// mounts and hands the `/dev/fuse` descriptor back over a socket named by `_FUSE_COMMFD`.
fn fusermount(cfg: &MountConfig) -> std::io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, RawFd};
    let mut fds: [RawFd; 2] = [0; 2];
    // SAFETY: socketpair writes two descriptors into fds.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours alone.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // fusermount3 inherits its end.
    // SAFETY: F_SETFD on a descriptor we own.
    if unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut opts = vec![
        format!("fsname={}", cfg.image.display()).replace(',', "\\,"),
        "subtype=nearfs".to_string(),
        if cfg.read_only { "ro" } else { "rw" }.to_string(),
    ];
    for (set, name) in [
        (cfg.allow_other, "allow_other"),
        (cfg.default_permissions, "default_permissions"),
    ] {
        if set {
            opts.push(name.to_string());
        }
    }
    opts.extend(cfg.passthrough.iter().map(|p| p.as_str().to_string()));
    let status = std::process::Command::new("fusermount3")
        .arg("-o")
        .arg(opts.join(","))
        .arg("--")
        .arg(&cfg.mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .status()?;
    drop(theirs);
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "fusermount3 failed ({status})"
        )));
    }
    receive_fd(&ours)
}

/// Receives one descriptor sent with SCM_RIGHTS.
fn receive_fd(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one descriptor, aligned as cmsghdr wants.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes it states.
    if unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: msg was filled in by recvmsg; CMSG_FIRSTHDR checks the length it reported.
    let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: c is null or points at a header within control, as recvmsg filled it.
    let rights = unsafe { c.as_ref() }
        .is_some_and(|h| h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS);
    if !rights {
        return Err(std::io::Error::other("fusermount3 sent no descriptor"));
    }
    // SAFETY: an SCM_RIGHTS message carries at least one int; it may be unaligned.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>()) };
    // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mounts and completes the FUSE handshake: ourselves as root, through fusermount3 otherwise.
fn start_session(cfg: &MountConfig) -> Result<(Session, Unmount)> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let (fd, unmount) = if unsafe { libc::geteuid() } == 0 {
        let fd = kernel_mount(cfg);
        (fd, Unmount::Kernel(cfg.mountpoint.clone()))
    } else {
        (fusermount(cfg), Unmount::Fusermount(cfg.mountpoint.clone()))
    };
    let fd = fd.with_context(|| format!("cannot mount on {}", cfg.mountpoint.display()))?;
    let init = InitConfig {
        uring: cfg.uring,
        ..daemon::INIT
    };
    match Session::new(fd, init, cfg.threads) {
        Ok(session) => Ok((session, unmount)),
        Err(e) => {
            unmount.unmount();
            Err(anyhow::Error::from(e).context("FUSE handshake failed"))
        }
    }
}

/// FUSE read requests are as large as the mount's readahead, which the kernel starts at
/// 128 KiB whatever the daemon asks for in INIT; raising it to 1 MiB (the largest request
/// nearfs accepts) halves the cost per byte of sequential reads (docs/benchmarks.md).
/// Only root may; without it the default stays.
///
/// The device number comes from /proc/self/mountinfo: stat() on the mountpoint would wait
/// for this very daemon, which does not serve requests yet.
fn raise_readahead(mountpoint: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mountpoint.to_string_lossy();
    // Fields: id parent major:minor root mountpoint ...; the last mount there is ours.
    let Some(dev) = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_ref())).then(|| f[2].to_string())
    }) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "1024") {
        tracing::debug!(%knob, error = %e, "cannot raise readahead");
    }
}

/// `mount -o remount,...` on a nearfs mount: change the kernel's mount flags in place.
pub fn remount(mountpoint: &Path, options: &str) -> Result<()> {
    let mut cfg = MountConfig::new(PathBuf::new(), mountpoint.to_owned());
    let kept: Vec<&str> = options
        .split(',')
        .filter(|o| {
            let key = o.split('=').next().unwrap_or("");
            !matches!(
                key,
                "remount"
                    | "user_id"
                    | "group_id"
                    | "rootmode"
                    | "fd"
                    | "max_read"
                    | "blksize"
                    | ""
            )
        })
        .collect();
    cfg.apply_options(&kept.join(","))?;
    let target = cstring(mountpoint)?;
    // SAFETY: target is NUL-terminated; the other pointers may be null for a remount.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | mount_flags(&cfg),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot remount {}", mountpoint.display()));
    }
    Ok(())
}

/// Points stdin and stdout at /dev/null and stderr (the log) at `log` or /dev/null, once
/// the parent has gone.
fn detach_stdio(log: Option<&Path>) {
    use std::os::fd::AsRawFd;
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let err = log.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    for (fd, target) in [(0, &null), (1, &null), (2, err.as_ref().unwrap_or(&null))] {
        // SAFETY: dup2 onto a standard descriptor from a descriptor we hold open.
        unsafe { libc::dup2(target.as_raw_fd(), fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_round_trip() {
        let mut c = MountConfig::new("a".into(), "b".into());
        c.apply_options(
            "allow_other,ro,commit=2,threads=3,uring,nodev,defaults,x-systemd.automount,log=/tmp/l,\
             offload=ro,offload_runs=9,offload_programs=5,offload_bytes=2M,latency=80",
        )
        .unwrap();
        assert!(c.allow_other && c.read_only && c.commit_secs == 2 && c.threads == 3);
        // The daemonized child gets every option.
        let mut d = MountConfig::new("a".into(), "b".into());
        d.apply_options(&options_string(&c)).unwrap();
        assert!(d.allow_other && d.read_only && d.commit_secs == 2 && d.threads == 3);
        assert!(c.uring && d.uring);
        assert_eq!(d.offload.policy, Policy::ReadOnly);
        assert_eq!(d.offload.runs_per_user, 9);
        assert_eq!(d.offload.programs_per_user, 5);
        assert_eq!(d.offload.bytes_per_user, 2 << 20);
        assert_eq!(d.offload.workers, 3);
        assert_eq!(d.offload, c.offload);
        assert_eq!(d.latency, Duration::from_micros(80));
        assert_eq!(d.passthrough, vec![MountOption::NoDev]);
        assert_eq!(d.log.as_deref(), Some(Path::new("/tmp/l")));
        assert!(c.apply_options("bogus").is_err());
        assert!(c.apply_options("commit=0").is_err());
        assert!(c.apply_options("latency=2s").is_err());
        assert!(c.apply_options("offload_bytes=1K").is_err());
        assert!(c.apply_options("offload_programs=0").is_err());
    }
}
