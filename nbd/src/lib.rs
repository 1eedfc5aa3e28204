//! The NBD protocol for nearfs (`docs/nbd.md`): a server that exports a device and, as
//! the nearfs storage target, runs appcode next to it ([`server`]); a block device on any
//! NBD server's export, which runs appcode at the target when it offers the extension
//! ([`client`]); and the bytes both put on the wire ([`wire`], [`appcode_ext`]).
//!
//! The protocol is the NetworkBlockDevice project's `doc/proto.md`, so qemu-io, nbdinfo,
//! nbdcopy and fio's nbd engine work with the server, and the client works with qemu-nbd
//! and nbdkit. Appcode is an extension negotiated with an option; without it a client sees
//! a plain NBD server.

pub mod appcode_ext;
pub mod client;
pub mod server;
pub mod wire;

pub use client::{NbdDevice, NbdUrl, NotAtTarget, Options, RemoteProgram, RemoteWorld};
pub use server::{Config, Export, Server, Stopper};
