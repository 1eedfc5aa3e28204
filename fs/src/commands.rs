//! `nearfs mkfs`, `fsck` and `info`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use blockdev::{BlockDevice, FileDevice};
use extents::fsck::FsckReport;
use extents::{Fs, FsError, MkfsOptions, MountOptions};

use crate::mount::open_device;

/// Parses sizes like `4G`, `512M`, `65536`, `1.5T` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let mult: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("unknown size unit in {s:?} (use K, M, G or T)"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("not a size: {s:?}"))?;
    if !(n.is_finite() && n > 0.0) {
        bail!("size must be positive: {s:?}");
    }
    Ok((n * mult as f64) as u64)
}

fn progress(done: u64, total: u64) {
    eprint!(
        "\rzeroing metadata region: {:>3}%",
        done * 100 / total.max(1)
    );
    if done == total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}

/// Formats an image file (created sparse when missing) or a block device.
pub fn mkfs(path: &Path, size: Option<u64>, force: bool) -> Result<()> {
    let remote = crate::mount::nbd_url(path).is_some();
    if remote && size.is_some() {
        bail!("--size applies to image files; an NBD export has the size its server gives it");
    }
    if remote {
    } else if !path.exists() {
        let size =
            size.context("the image does not exist; give its size with --size (e.g. --size 4G)")?;
        FileDevice::create_image(path, size)
            .with_context(|| format!("cannot create {}", path.display()))?;
    } else if let Some(size) = size {
        let meta = std::fs::metadata(path)?;
        if !meta.is_file() {
            bail!(
                "--size applies to image files; {} is a device of fixed size",
                path.display()
            );
        }
        if meta.len() != size {
            if !force && meta.len() != 0 {
                bail!(
                    "{} exists with a different size; add --force to resize and format it",
                    path.display()
                );
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(size)?;
        }
    }
    let dev = open_device(path, false, false)?;
    let large = dev.len() >= 16 << 30;
    let opts = MkfsOptions {
        force,
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        root_uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        root_gid: unsafe { libc::getgid() },
        progress: large.then_some(progress as fn(u64, u64)),
    };
    let sb = match Fs::mkfs(dev.clone(), opts) {
        Err(FsError::Exists) => bail!(
            "{} already holds a nearfs filesystem; add --force to overwrite it",
            path.display()
        ),
        other => other?,
    };
    let mib = |blocks: u64| (blocks * extents::BLOCK_SIZE) >> 20;
    println!(
        "nearfs: formatted {} ({} MiB: {} MiB metadata, {} MiB data), uuid {}",
        path.display(),
        mib(sb.total_blocks),
        mib(sb.meta_blocks),
        mib(sb.data_blocks),
        sb.uuid_string()
    );
    Ok(())
}

/// Prints a report and returns the fsck(8) exit status.
pub fn fsck(path: &Path, repair: bool) -> i32 {
    // Opened for writing even without --repair: the store's own integrity check may
    // finish a commit that a crash interrupted. nearfs-level metadata is left alone.
    let dev: Arc<dyn BlockDevice> = match open_device(path, false, false) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("nearfs fsck: {e:#}");
            return 8;
        }
    };
    match extents::fsck::fsck(dev, repair) {
        Ok(report) => print_report(path, &report, repair),
        Err(e @ (FsError::Corrupt { .. } | FsError::Store(_))) => {
            println!("{}: {e}", path.display());
            println!(
                "{}: cannot be checked further; the damage is outside what --repair mends",
                path.display()
            );
            4
        }
        Err(e) => {
            eprintln!("nearfs fsck: {}: {e}", path.display());
            8
        }
    }
}

fn print_report(path: &Path, r: &FsckReport, repair: bool) -> i32 {
    for e in &r.errors {
        println!("error: {e}");
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    for f in &r.repaired {
        println!("repaired: {f}");
    }
    let state = if r.errors.is_empty() {
        "clean"
    } else if repair && r.exit_code() == 1 {
        "repaired"
    } else {
        "HAS ERRORS"
    };
    println!(
        "{}: {state}: {} inodes ({} directories), {} extents, {} blocks in use, {} free",
        path.display(),
        r.inodes,
        r.directories,
        r.extents,
        r.allocated_blocks,
        r.free_blocks
    );
    if !r.errors.is_empty() && !repair {
        println!("run `nearfs fsck --repair {}` to repair", path.display());
    }
    r.exit_code()
}

/// Prints the format version, sizes, free space and fragmentation.
pub fn info(path: &Path) -> Result<()> {
    let dev = open_device(path, true, false)?;
    let fs = Fs::mount(
        dev,
        MountOptions {
            read_only: true,
            kernel_refs: false,
        },
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    let i = fs.info();
    let bytes = |blocks: u64| human(blocks * i.block_size);
    println!("image:               {}", path.display());
    println!("format version:      {}", i.format_version);
    println!("uuid:                {}", i.uuid);
    println!("block size:          {}", i.block_size);
    println!("device size:         {}", bytes(i.total_blocks));
    println!("data region:         {}", bytes(i.data_blocks));
    println!(
        "free:                {} ({:.1}%)",
        bytes(i.free_blocks),
        100.0 * i.free_blocks as f64 / i.data_blocks.max(1) as f64
    );
    println!(
        "free runs:           {} (largest {})",
        i.free_runs,
        bytes(i.largest_free_run)
    );
    println!(
        "free-space fragmentation: {:.1}%",
        100.0 * i.free_space_fragmentation()
    );
    println!("inodes:              {}", i.inodes);
    println!(
        "extents per file:    {:.2} ({} extents in {} files)",
        i.extents_per_file(),
        i.extents,
        i.files_with_data
    );
    println!(
        "metadata:            {} of {}",
        human(i.meta_bytes_used),
        human(i.meta_bytes_capacity)
    );
    Ok(())
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
    }
}
