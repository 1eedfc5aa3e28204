//! Any bytes from a client, to the server's handshake or (after a valid handshake) to its
//! request parser. The server must answer or close within its time, and still serve a
//! well-behaved client afterwards, whatever came before.
//!
//! Input: one mode byte, then what the client sends. Mode bit 0: do a valid handshake first
//! (structured replies, the appcode extension, GO), so the rest reaches transmission.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use appcode::Limits;
use blockdev::MemDevice;
use libfuzzer_sys::fuzz_target;
use nbd::wire::{self, Put, opt, rep};
use nbd::{Config, Export, NbdDevice, NbdUrl, Options, Server};

fn target() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let export = Export {
            name: "fuzz".into(),
            device: Arc::new(MemDevice::new(1 << 20)),
            read_only: false,
        };
        let config = Config {
            threads: 2,
            memory: 128 << 20,
            handshake_timeout: Duration::from_secs(1),
            limits: Limits {
                wall: Duration::from_millis(50),
                ..Config::default().limits
            },
            ..Config::default()
        };
        let server = Server::bind("127.0.0.1:0", export, config).expect("bind");
        let addr = server.local_addr().expect("addr");
        std::thread::spawn(move || server.serve());
        addr
    })
}

fn option_reply(s: &mut TcpStream) -> Option<u32> {
    let mut h = [0; 20];
    s.read_exact(&mut h).ok()?;
    let kind = u32::from_be_bytes(h[12..16].try_into().ok()?);
    let len = u32::from_be_bytes(h[16..20].try_into().ok()?);
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).ok()?;
    Some(kind)
}

fn handshake(s: &mut TcpStream, token: u64) -> Option<()> {
    s.write_all(&3u32.to_be_bytes()).ok()?;
    wire::write_option(s, opt::STRUCTURED_REPLY, &[]).ok()?;
    option_reply(s)?;
    let mut ext = Vec::new();
    ext.put_u32(1);
    ext.put_u64(token);
    wire::write_option(s, opt::NEARFS_APPCODE, &ext).ok()?;
    option_reply(s)?;
    let mut go = Vec::new();
    go.put_u32(0);
    go.put_u16(0);
    wire::write_option(s, opt::GO, &go).ok()?;
    while option_reply(s)? != rep::ACK {}
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let addr = target();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0; 18];
    s.read_exact(&mut hello).expect("hello");
    if mode & 1 == 1 {
        // Every connection claims for the same mount, so that none is refused the claim.
        handshake(&mut s, 7).expect("a valid handshake");
    }
    let _ = s.write_all(rest);
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0; 1 << 16];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the server neither answered nor closed within 10 s")
            }
            Err(_) => break,
        }
    }
    // Whatever came before, a well-behaved client is served.
    let url = NbdUrl::parse(&format!("nbd://{addr}/fuzz")).unwrap().unwrap();
    let dev = NbdDevice::connect(&url, Options::default()).expect("the server still serves");
    let mut b = [0; 8];
    blockdev::BlockDevice::read_at(&dev, &mut b, 0).expect("the server still reads");
});
