//! Extended attributes computed by the daemon: the window into the filesystem.
//!
//! Values are single lines of `key=value` words, so that `getfattr -d` shows them as they
//! are (it escapes newlines) and scripts split them with `tr`/`awk`:
//!
//! - `user.nearfs.extents` (regular files): extents in file order, separated by `; `,
//!   each `file=OFFSET dev=OFFSET len=BYTES STATE` with STATE `written` or `unwritten`;
//!   empty for a file without blocks.
//! - `user.nearfs.stats` (regular files): offload counters since mount: `runs failures
//!   hops device_bytes bytes_returned insns run_ns`.
//! - `user.nearfs.fs` (root directory): filesystem facts, how FUSE requests arrive
//!   (`fuse=io_uring` or `fuse=dev`), then the mount's offload settings (policy,
//!   per-user limits, workers) and what users hold.
//! - `user.nearfs.programs` (root directory): the loaded programs, separated by `; `, each
//!   `id name owner insns max_insns verify_states load_us compile_us bytes` (load_us: reading,
//!   verifying and compiling; bytes: what the program holds, charged to its owner).
//!
//! Reading a view needs read permission on its inode, as reading a stored `user.*`
//! attribute does.
//!
//! `user.nearfs.offload` is not a view but a stored owner policy (`off`, `ro` or `rw`).

use extents::access::MAY_READ;
use extents::{BLOCK_SIZE, Creds, FileKind, Fs, Ino};

use crate::offload::Offload;

pub const EXTENTS: &str = "user.nearfs.extents";
pub const STATS: &str = "user.nearfs.stats";
pub const FS_FACTS: &str = "user.nearfs.fs";
pub const PROGRAMS: &str = "user.nearfs.programs";

/// The view names that apply to an inode of `kind`.
pub fn names_for(ino: Ino, kind: FileKind) -> Vec<&'static str> {
    let mut v = Vec::new();
    if kind == FileKind::RegularFile {
        v.push(EXTENTS);
        v.push(STATS);
    }
    if ino == Ino::ROOT {
        v.push(FS_FACTS);
        v.push(PROGRAMS);
    }
    v
}

/// The value of view `name` on `ino` for `creds`, or None if no such view applies.
pub fn view(
    fs: &Fs,
    offload: &Offload,
    transport: &str,
    creds: &Creds,
    ino: Ino,
    kind: FileKind,
    name: &[u8],
) -> Option<extents::Result<Vec<u8>>> {
    let applies = names_for(ino, kind).iter().any(|n| n.as_bytes() == name);
    if !applies {
        return None;
    }
    if let Err(e) = fs.access(creds, ino, MAY_READ) {
        return Some(Err(e));
    }
    Some(match name {
        n if n == EXTENTS.as_bytes() => extents_view(fs, ino),
        n if n == STATS.as_bytes() => Ok(offload.file_stats(ino).into_bytes()),
        n if n == PROGRAMS.as_bytes() => Ok(offload.programs().into_bytes()),
        _ => Ok(fs_view(fs, offload, transport)),
    })
}

fn extents_view(fs: &Fs, ino: Ino) -> extents::Result<Vec<u8>> {
    let parts: Vec<String> = fs
        .extents(ino)?
        .iter()
        .map(|e| {
            let state = if e.unwritten { "unwritten" } else { "written" };
            let (file, dev, len) = (
                e.file.0 * BLOCK_SIZE,
                e.dev.byte_offset(),
                e.len * BLOCK_SIZE,
            );
            format!("file={file} dev={dev} len={len} {state}")
        })
        .collect();
    Ok(parts.join("; ").into_bytes())
}

fn fs_view(fs: &Fs, offload: &Offload, transport: &str) -> Vec<u8> {
    let i = fs.info();
    let rows: [(&str, String); 15] = [
        ("format_version", i.format_version.to_string()),
        ("uuid", i.uuid.clone()),
        ("block_size", i.block_size.to_string()),
        ("device_bytes", (i.total_blocks * i.block_size).to_string()),
        ("data_bytes", (i.data_blocks * i.block_size).to_string()),
        ("free_bytes", (i.free_blocks * i.block_size).to_string()),
        (
            "pending_free_bytes",
            (i.pending_free_blocks * i.block_size).to_string(),
        ),
        ("free_runs", i.free_runs.to_string()),
        (
            "largest_free_run_bytes",
            (i.largest_free_run * i.block_size).to_string(),
        ),
        ("inodes", i.inodes.to_string()),
        ("extents_per_file", format!("{:.2}", i.extents_per_file())),
        ("metadata_bytes_used", i.meta_bytes_used.to_string()),
        ("metadata_bytes_capacity", i.meta_bytes_capacity.to_string()),
        ("read_only", fs.is_read_only().to_string()),
        ("fuse", transport.to_string()),
    ];
    let words: Vec<String> = rows
        .into_iter()
        .chain(offload.facts())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    words.join(" ").into_bytes()
}
