//! What every benchmark stands on: a nearfs mount over an image (remounted with each device
//! latency), host-filesystem copies of the same files, compiled programs, buffers O_DIRECT
//! accepts, and a description of the machine.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nearfs_client::ProgId;

/// Where the harness works: `image` is the nearfs device, `mnt` its mount point, `host` a
/// directory of the host filesystem holding copies of the benchmark files, `objects` the
/// compiled programs.
pub struct Work {
    pub root: PathBuf,
    pub image: PathBuf,
    pub mnt: PathBuf,
    pub host: PathBuf,
    pub objects: PathBuf,
    nearfs: PathBuf,
}

impl Work {
    /// A fresh directory under `parent`, with a new sparse image of `size` bytes.
    pub fn create(parent: &Path, size: u64) -> Result<Work> {
        Work::create_named(parent, "", size)
    }

    /// The same, with `tag` in the directory's name so that several can live at once.
    pub fn create_named(parent: &Path, tag: &str, size: u64) -> Result<Work> {
        let parent = std::fs::canonicalize(parent)
            .with_context(|| format!("cannot find {}", parent.display()))?;
        let root = parent.join(format!("nearfs-bench.{}{tag}", std::process::id()));
        let work = Work {
            image: root.join("disk.img"),
            mnt: root.join("mnt"),
            host: root.join("host"),
            objects: root.join("objects"),
            root,
            nearfs: sibling_binary("nearfs")?,
        };
        std::fs::create_dir_all(&work.mnt)?;
        std::fs::create_dir_all(&work.host)?;
        std::fs::create_dir_all(&work.objects)?;
        let out = Command::new(&work.nearfs)
            .arg("mkfs")
            .arg(&work.image)
            .arg("--size")
            .arg(size.to_string())
            .output()?;
        if !out.status.success() {
            bail!("nearfs mkfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(work)
    }

    /// Mounts the image with `latency_us` added to every device access; unmounted on drop.
    pub fn mount(&self, latency_us: u64) -> Result<Mounted<'_>> {
        self.mount_device(self.image.as_os_str(), &format!("latency={latency_us}"))
    }

    /// Mounts `device` (the image, or an `nbd://` URL) with mount options `options`;
    /// unmounted on drop.
    pub fn mount_device(&self, device: &std::ffi::OsStr, options: &str) -> Result<Mounted<'_>> {
        let out = Command::new(&self.nearfs)
            .arg("mount")
            .arg(device)
            .arg(&self.mnt)
            .arg("-o")
            .arg(options)
            .output()?;
        if !out.status.success() {
            bail!(
                "nearfs mount {}: {}",
                device.to_string_lossy(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Mounted {
            work: self,
            device: device.to_os_string(),
        })
    }

    /// The `nearfs` binary beside this one.
    pub fn nearfs(&self) -> &Path {
        &self.nearfs
    }

    /// Compiles `source` (relative to this crate) and loads it through `file`'s mount.
    pub fn load(&self, file: &File, source: &str) -> Result<ProgId> {
        let object = compile(&source_dir(source), &self.objects)?;
        nearfs_client::load(file, &object, None).with_context(|| format!("loading {source}"))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.root).ok();
    }
}

/// A live mount of [`Work::image`], or of an NBD export, at [`Work::mnt`].
pub struct Mounted<'a> {
    work: &'a Work,
    /// What the daemon was started with (its command line names it).
    device: OsString,
}

impl Mounted<'_> {
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.mnt.join(name)
    }

    pub fn mount_point(&self) -> &Path {
        &self.work.mnt
    }
}

impl Drop for Mounted<'_> {
    /// Unmounts and waits until the daemon has let go of the device, so that the next mount
    /// (or removing the directory, or a server on the image) does not find it busy.
    fn drop(&mut self) {
        let mnt = &self.work.mnt;
        for _ in 0..50 {
            let done = Command::new("fusermount3")
                .arg("-u")
                .arg(mnt)
                .status()
                .is_ok_and(|s| s.success())
                || Command::new("umount")
                    .arg(mnt)
                    .status()
                    .is_ok_and(|s| s.success());
            if done {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let image = self.device.as_bytes().to_vec();
        for _ in 0..150 {
            let held = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .any(|p| {
                    std::fs::read(p.path().join("cmdline"))
                        .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == image))
                });
            if !held {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A binary built next to this one (`cargo build --release` puts them together).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release`",
            path.display()
        );
    }
    Ok(path)
}

/// The repository's `bpf-progs/` (examples and the header) and this crate's `progs/`.
pub fn source_dir(which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(which)
}

/// Compiles an appcode source with clang as the examples are built (`-mcpu=v3`).
pub fn compile(source: &Path, out_dir: &Path) -> Result<Vec<u8>> {
    let stem = source.file_stem().context("a source file")?;
    let out = out_dir.join(stem).with_extension("o");
    let result = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-c", "-I"])
        .arg(source_dir("../bpf-progs/include"))
        .arg(source)
        .arg("-o")
        .arg(&out)
        .output()
        .context("appcode is compiled with clang (scripts/setup.sh installs it)")?;
    if !result.status.success() {
        bail!(
            "clang {}: {}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    Ok(std::fs::read(out)?)
}

/// Opens `path` for reading, with O_DIRECT if `direct` (every read then goes to the
/// filesystem: the daemon, for a nearfs mount; the disk, for the host filesystem).
pub fn open(path: &Path, direct: bool, write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Drops a file's pages from the kernel's page cache.
pub fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise takes a descriptor and numbers; it touches no memory of ours.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Tells the kernel reads of `f` are random, so that it reads ahead nothing.
pub fn no_readahead(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as in drop_cache.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
}

/// A block-aligned buffer, as O_DIRECT needs.
pub struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let bytes = vec![0u8; len + 4096];
        let start = bytes.as_ptr().align_offset(4096);
        Aligned { bytes, start, len }
    }

    pub fn get(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// One extent of a file as `user.nearfs.extents` shows it.
#[derive(Clone, Copy, Debug)]
pub struct Extent {
    pub file: u64,
    pub dev: u64,
    pub len: u64,
}

/// An extended attribute of `path`, as text.
pub fn xattr(path: &Path, name: &str) -> Result<String> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let cname = CString::new(name)?;
    let mut value = vec![0u8; 1 << 16];
    // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("{name} of {}", path.display()));
    }
    Ok(String::from_utf8_lossy(&value[..n as usize]).into_owned())
}

/// The device extents of a file on a nearfs mount.
pub fn extents(path: &Path) -> Result<Vec<Extent>> {
    parse_extents(&xattr(path, "user.nearfs.extents")?)
}

/// Offload runs on a file so far and the daemon's time on them (`user.nearfs.stats`).
pub fn run_stats(path: &Path) -> Result<(u64, u64)> {
    let stats = xattr(path, "user.nearfs.stats")?;
    Ok((number(&stats, "runs=")?, number(&stats, "run_ns=")?))
}

/// One counter of `user.nearfs.stats` of a file (`"runs="`, `"remote_runs="`, …).
pub fn file_stat(path: &Path, key: &str) -> Result<u64> {
    number(&xattr(path, "user.nearfs.stats")?, key)
}

/// The number after `key` (e.g. `"runs="`) among the words of `text`.
pub fn number(text: &str, key: &str) -> Result<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no {key} in {text:?}"))?
        .parse()
        .with_context(|| format!("{key} in {text:?}"))
}

/// `file=OFFSET dev=OFFSET len=BYTES written|unwritten` entries separated by `; `.
fn parse_extents(text: &str) -> Result<Vec<Extent>> {
    text.split(';')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            Ok(Extent {
                file: number(e, "file=")?,
                dev: number(e, "dev=")?,
                len: number(e, "len=")?,
            })
        })
        .collect()
}

/// The device offset of file offset `off`, within one extent.
pub fn translate(extents: &[Extent], off: u64) -> Option<u64> {
    extents
        .iter()
        .find(|e| (e.file..e.file + e.len).contains(&off))
        .map(|e| e.dev + off - e.file)
}

/// The CPU, core count, memory and kernel, for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} × {cpu}, {} GiB RAM, Linux {}",
        mem_kib >> 20,
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_offsets_translate_within_their_extent() {
        let ext = [
            Extent {
                file: 0,
                dev: 40960,
                len: 8192,
            },
            Extent {
                file: 8192,
                dev: 4096,
                len: 4096,
            },
        ];
        assert_eq!(translate(&ext, 0), Some(40960));
        assert_eq!(translate(&ext, 8191), Some(49151));
        assert_eq!(translate(&ext, 8192), Some(4096));
        assert_eq!(translate(&ext, 12288), None);
    }

    #[test]
    fn extents_parse_as_the_xattr_shows_them() {
        let e = parse_extents(
            "file=0 dev=138412032 len=4096 written; file=4096 dev=8192 len=8192 unwritten",
        )
        .unwrap();
        assert_eq!((e[0].file, e[0].dev, e[0].len), (0, 138412032, 4096));
        assert_eq!((e[1].file, e[1].dev, e[1].len), (4096, 8192, 8192));
        assert!(parse_extents("").unwrap().is_empty());
        assert!(parse_extents("file=0 dev=x len=1").is_err());
    }

    #[test]
    fn aligned_buffers_suit_o_direct() {
        let mut b = Aligned::new(4096);
        assert_eq!(b.get().len(), 4096);
        assert_eq!(b.get().as_ptr() as usize % 4096, 0);
    }
}
