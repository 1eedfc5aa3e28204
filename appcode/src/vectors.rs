//! The eBPF conformance suite's test vectors (`../shared/bpf_conformance/tests/*.data`):
//! sections `-- asm`, `-- mem`, `-- raw` and `-- result`; other sections are comments.

use std::path::{Path, PathBuf};

/// One conformance vector.
pub struct Vector {
    /// The `-- asm` section.
    pub asm: String,
    /// The `-- mem` bytes (r1 points at them, r2 holds their length).
    pub mem: Vec<u8>,
    /// The `-- raw` encoding, one u64 per slot, if given.
    pub raw: Option<Vec<u64>>,
    /// The expected r0.
    pub result: Option<u64>,
}

impl Vector {
    /// Parses a `.data` file.
    pub fn parse(text: &str) -> Vector {
        let mut v = Vector {
            asm: String::new(),
            mem: Vec::new(),
            raw: None,
            result: None,
        };
        let mut section = "";
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("-- ") {
                section = name.trim();
                continue;
            }
            let body = line.split('#').next().unwrap_or("").trim();
            match section {
                "asm" => {
                    v.asm.push_str(line);
                    v.asm.push('\n');
                }
                "mem" => v.mem.extend(
                    body.split_whitespace()
                        .filter_map(|b| u8::from_str_radix(b, 16).ok()),
                ),
                "raw" if !body.is_empty() => {
                    let word =
                        u64::from_str_radix(body.trim_start_matches("0x"), 16).unwrap_or(u64::MAX);
                    v.raw.get_or_insert_with(Vec::new).push(word);
                }
                "result" if !body.is_empty() => {
                    v.result = u64::from_str_radix(body.trim_start_matches("0x"), 16).ok();
                }
                _ => {}
            }
        }
        v
    }
}

/// The vectors in `dir`, sorted by name.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .collect();
    files.sort();
    Ok(files)
}

/// The environment variable that says where the suite's `tests/` directory is.
pub const DIR_ENV: &str = "NEARFS_CONFORMANCE_DIR";

/// Where the suite lives when nothing says otherwise: `shared/` beside the repository.
pub fn default_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bpf_conformance/tests")
}

/// Where the suite is: `$NEARFS_CONFORMANCE_DIR` if set (it must exist then), else
/// [`default_dir`] if it exists; otherwise why not, for tests to report as skipped (a
/// plain clone has no `shared/` beside it).
pub fn dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os(DIR_ENV) {
        return Ok(PathBuf::from(d));
    }
    let d = default_dir();
    if d.is_dir() {
        Ok(d)
    } else {
        Err(format!(
            "no eBPF conformance vectors at {} and {DIR_ENV} is not set",
            d.display()
        ))
    }
}
