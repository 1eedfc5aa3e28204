//! The nearfs daemon and command-line tool: the FUSE session (`/dev/fuse` and io_uring,
//! `fuse`) and adapter (`daemon`), mounting, the mkfs/fsck/info commands, and the NBD
//! storage target (`nearfs serve`). `main.rs` only parses arguments and calls in here.

pub mod commands;
pub mod daemon;
pub mod demo;
pub mod errno;
pub mod fuse;
pub mod inspect;
pub mod mount;
pub mod offload;
pub mod prog;
pub mod serve;
pub mod workers;
