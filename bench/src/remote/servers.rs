//! NBD servers started by the benchmark: `nearfs serve` (with and without the appcode
//! extension), `qemu-nbd` and `nbdkit file`, each on a free loopback port, in the
//! foreground, stopped when dropped. They are also asked to die with the thread that
//! started them (`PR_SET_PDEATHSIG`), so that none outlives a benchmark that was killed.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The export name every server is asked to serve.
pub const EXPORT: &str = "bench";

/// How long a server may take to accept connections.
const READY: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `nearfs serve`: plain blocks, and appcode run next to the image.
    Nearfs,
    /// `nearfs serve --no-appcode`: plain blocks only.
    NearfsBlocks,
    /// `qemu-nbd` (QEMU's server), raw format, its default writeback cache.
    Qemu,
    /// `nbdkit file` (its file plugin), default settings.
    Nbdkit,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Nearfs => "nearfs serve",
            Kind::NearfsBlocks => "nearfs serve --no-appcode",
            Kind::Qemu => "qemu-nbd",
            Kind::Nbdkit => "nbdkit file",
        }
    }

    /// The program to run, to ask whether it is installed.
    fn program(self, nearfs: &Path) -> PathBuf {
        match self {
            Kind::Nearfs | Kind::NearfsBlocks => nearfs.to_path_buf(),
            Kind::Qemu => "qemu-nbd".into(),
            Kind::Nbdkit => "nbdkit".into(),
        }
    }

    /// Whether this machine has it (`--version` runs).
    pub fn installed(self, nearfs: &Path) -> bool {
        Command::new(self.program(nearfs))
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn command(self, nearfs: &Path, image: &Path, port: u16) -> Command {
        let mut c = Command::new(self.program(nearfs));
        match self {
            Kind::Nearfs | Kind::NearfsBlocks => {
                c.arg("serve")
                    .arg(image)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--export")
                    .arg(EXPORT);
                if self == Kind::NearfsBlocks {
                    c.arg("--no-appcode");
                }
            }
            Kind::Qemu => {
                // --persistent: keep serving after a client leaves (the readiness probe is
                // one); --shared: several clients at once.
                c.args([
                    "--format=raw",
                    "--persistent",
                    "--shared=8",
                    "--bind=127.0.0.1",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--export-name={EXPORT}"))
                .arg(image);
            }
            Kind::Nbdkit => {
                c.args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1"])
                    .arg("-p")
                    .arg(port.to_string())
                    .arg("--exportname")
                    .arg(EXPORT)
                    .arg("file")
                    .arg(image);
            }
        }
        c
    }
}

/// A running server; killed and waited for when dropped.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `kind` serving `image` on a free loopback port and waits until it greets
    /// clients. Its output goes to a log file in `logs`.
    pub fn start(kind: Kind, nearfs: &Path, image: &Path, logs: &Path) -> Result<Server> {
        let mut last = None;
        // A port found free can be taken by someone else before the server binds it.
        for _ in 0..3 {
            let port = free_port()?;
            let log = logs.join(format!("server-{port}.log"));
            let out = std::fs::File::create(&log)?;
            let mut cmd = kind.command(nearfs, image, port);
            cmd.stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            die_with_parent(&mut cmd);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", kind.label()))?;
            let mut server = Server {
                kind,
                port,
                child,
                log,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/{EXPORT}", self.port)
    }

    /// Until a connection gets the NBD greeting; fails if the server exits first.
    fn wait_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        while start.elapsed() < READY {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before serving: {}",
                    self.kind.label(),
                    std::fs::read_to_string(&self.log)
                        .unwrap_or_default()
                        .trim()
                );
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut magic = [0u8; 8];
                if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} did not start serving on port {} within {READY:?}",
            self.kind.label(),
            self.port
        )
    }
}

impl Drop for Server {
    /// SIGTERM, a few seconds to go, then SIGKILL; always reaped.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill takes a pid and a signal number; the pid is our own child, not
            // yet reaped, so it cannot name another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the kernel to kill `cmd`'s process when the thread that starts it ends (the
/// benchmark killed, or failing past its cleanup).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
    // which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}
