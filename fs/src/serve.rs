//! `nearfs serve`: the storage target. Exports an image or block device over NBD and runs
//! appcode next to it for the nearfs mounts that ask (`docs/nbd.md`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use nbd::{Config, Export, Server};

use crate::mount::open_device;

/// What `nearfs serve` was asked for.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: String,
    pub export: String,
    pub read_only: bool,
    /// Threads per connection.
    pub threads: usize,
    /// Whether to offer the appcode extension.
    pub appcode: bool,
}

/// Serves until killed. The device is locked against nearfs mounts on this machine, as a
/// mount locks it.
pub fn serve(device: &Path, cfg: &ServeConfig) -> Result<()> {
    let dev = open_device(device, cfg.read_only, false)?;
    let export = Export {
        name: cfg.export.clone(),
        device: dev,
        read_only: cfg.read_only,
    };
    let config = Config {
        threads: cfg.threads,
        appcode: cfg.appcode,
        handshake_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    let server = Server::bind(&cfg.listen, export, config)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = server.local_addr()?;
    eprintln!(
        "nearfs serve: {} as export {:?} on {addr}{}{}",
        device.display(),
        cfg.export,
        if cfg.read_only { ", read-only" } else { "" },
        if cfg.appcode {
            ", appcode at the target"
        } else {
            ""
        },
    );
    server.serve()?;
    Ok(())
}
