//! The server and the client over loopback, in process: plain block service, appcode at
//! the target, and every kind of malformed input the server must survive.

#[path = "../../appcode/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appcode::{Extent, Limits, Mode, Program, Request, RunError, World};
use blockdev::{BlockDevice, MemDevice};
use nbd::wire::{self, Put, cmd, opt, rep};
use nbd::{
    Config, Export, NbdDevice, NbdUrl, NotAtTarget, Options, RemoteProgram, RemoteWorld, Server,
    Stopper,
};

/// A server on a free loopback port, stopped when dropped.
struct Target {
    addr: SocketAddr,
    stopper: Stopper,
    device: Arc<MemDevice>,
}

impl Target {
    fn start(size: u64, config: Config) -> Target {
        let device = Arc::new(MemDevice::new(size));
        Target::on(device, config, "0")
    }

    fn on(device: Arc<MemDevice>, config: Config, port: &str) -> Target {
        let export = Export {
            name: "disk".into(),
            device: device.clone(),
            read_only: false,
        };
        // The port of a server just stopped frees once its thread has left.
        let mut tries = 0;
        let server = loop {
            match Server::bind(format!("127.0.0.1:{port}"), export.clone(), config.clone()) {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind: {e}"),
            }
        };
        let addr = server.local_addr().unwrap();
        let stopper = server.stopper().unwrap();
        std::thread::spawn(move || server.serve());
        Target {
            addr,
            stopper,
            device,
        }
    }

    fn url(&self) -> NbdUrl {
        NbdUrl::parse(&format!("nbd://127.0.0.1:{}/disk", self.addr.port()))
            .unwrap()
            .unwrap()
    }

    fn client(&self, appcode: Option<u64>) -> NbdDevice {
        NbdDevice::connect(
            &self.url(),
            Options {
                appcode,
                timeout: Duration::from_secs(5),
                ..Options::default()
            },
        )
        .unwrap()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stopper.stop();
    }
}

#[test]
fn urls_parse_as_qemu_writes_them() {
    let u = NbdUrl::parse("nbd://host:1234/exp").unwrap().unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.export.as_str()),
        ("host", 1234, "exp")
    );
    let u = NbdUrl::parse("nbd://[::1]/").unwrap().unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.export.as_str()),
        ("::1", 10809, "")
    );
    assert_eq!(u.to_string(), "nbd://[::1]:10809/");
    assert!(NbdUrl::parse("/dev/loop0").is_none());
    assert!(NbdUrl::parse("nbd://h:port/x").unwrap().is_err());
    assert!(NbdUrl::parse("nbd:///x").unwrap().is_err());
}

#[test]
fn blocks_written_through_the_client_are_on_the_target() {
    let t = Target::start(64 << 20, Config::default());
    let dev = t.client(None);
    assert_eq!(dev.len(), 64 << 20);
    let data = common_pattern(3 << 20);
    dev.write_at(&data, 12345).unwrap();
    dev.flush().unwrap();
    let mut back = vec![0; data.len()];
    t.device.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    let mut via = vec![0; data.len()];
    dev.read_at(&mut via, 12345).unwrap();
    assert_eq!(via, data);
    dev.write_zeroes(12345 + 4096, 8192).unwrap();
    dev.read_at(&mut via[..4096 * 4], 12345).unwrap();
    assert!(via[4096..4096 * 3].iter().all(|&b| b == 0));
    assert_eq!(&via[..4096], &data[..4096]);
    // Past the end: refused by the client before anything is sent, and by the server.
    assert!(dev.read_at(&mut [0; 10], (64 << 20) - 5).is_err());
    let requests = dev
        .counters()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(requests >= 5, "{requests} requests counted");
}

#[test]
fn many_threads_share_the_connections() {
    let t = Target::start(16 << 20, Config::default());
    let dev = Arc::new(t.client(None));
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let dev = dev.clone();
            s.spawn(move || {
                let block = vec![i as u8 + 1; 4096];
                for j in 0..50u64 {
                    let at = (i * 50 + j) * 4096;
                    dev.write_at(&block, at).unwrap();
                    let mut back = vec![0; 4096];
                    dev.read_at(&mut back, at).unwrap();
                    assert_eq!(back, block);
                }
            });
        }
    });
    let connects = dev
        .counters()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=4).contains(&connects), "{connects} connections");
}

fn common_pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// kv_increment's records: 64 bytes, a 56-byte key and a counter.
fn kv_file(records: u64) -> Vec<u8> {
    let mut f = Vec::new();
    for i in 0..records {
        let mut key = [0u8; 56];
        key[..8].copy_from_slice(&i.to_le_bytes());
        f.extend_from_slice(&key);
        f.extend_from_slice(&(i * 10).to_le_bytes());
    }
    f
}

fn kv_arg(slot: u64) -> Vec<u8> {
    let mut a = slot.to_le_bytes().to_vec();
    let mut key = [0u8; 56];
    key[..8].copy_from_slice(&slot.to_le_bytes());
    a.extend_from_slice(&key);
    a
}

#[test]
fn a_run_at_the_target_gives_what_a_run_in_the_daemon_gives() {
    let t = Target::start(8 << 20, Config::default());
    let dev = t.client(Some(1));
    assert!(dev.offers_appcode());
    let file = kv_file(128);
    // The file sits in two extents, the second before the first on the device.
    dev.write_at(&file[..4096], 1 << 20).unwrap();
    dev.write_at(&file[4096..], 64 << 10).unwrap();
    let extents = [
        Extent {
            file_off: 0,
            dev_off: 1 << 20,
            len: 4096,
            unwritten: false,
        },
        Extent {
            file_off: 4096,
            dev_off: 64 << 10,
            len: 4096,
            unwritten: false,
        },
    ];
    let object = common::compile_file(&common::progs_dir().join("kv_increment.c"), "v3");
    let local = Program::from_elf(&object, None, Mode::Checked).unwrap();
    let remote = RemoteProgram::new("", object);
    let size = file.len() as u64;
    for slot in [3u64, 100, 100] {
        let arg = kv_arg(slot);
        let req = Request {
            arg: &arg,
            limits: Limits::default(),
        };
        let world = RemoteWorld {
            extents: &extents,
            file_size: size,
            range: 0..size,
            writable: true,
        };
        let at_target = dev.run(&remote, world, &req).unwrap().unwrap();
        // What the target wrote is on its device; the daemon's run over the same device
        // (through the client) sees it and takes the counter one further.
        let here = local
            .run(
                World {
                    device: &dev,
                    extents: &extents,
                    file_size: size,
                    range: 0..size,
                    writable: true,
                },
                &req,
            )
            .unwrap();
        assert_eq!(here.result, at_target.result + 1, "slot {slot}");
        assert_eq!(here.costs.hops, at_target.costs.hops);
        assert_eq!(at_target.written.len(), 1);
    }
    let mut counter = [0u8; 8];
    // Slot 100 is in the second extent: 100 * 64 - 4096 = 2304 bytes into it.
    t.device
        .read_at(&mut counter, (64 << 10) + 2304 + 56)
        .unwrap();
    assert_eq!(u64::from_le_bytes(counter), 1000 + 4);
}

#[test]
fn a_run_cannot_reach_past_the_export_or_write_through_a_read_run() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(Some(1));
    let object = common::compile_file(&common::progs_dir().join("kv_increment.c"), "v3");
    let remote = RemoteProgram::new("kv_increment", object);
    let arg = kv_arg(0);
    let req = Request {
        arg: &arg,
        limits: Limits::default(),
    };
    let outside = [Extent {
        file_off: 0,
        dev_off: (1 << 20) - 4096,
        len: 8192,
        unwritten: false,
    }];
    let world = RemoteWorld {
        extents: &outside,
        file_size: 8192,
        range: 0..8192,
        writable: true,
    };
    let r = dev.run(&remote, world, &req).unwrap();
    assert!(
        matches!(r, Err(RunError::Io(ref m)) if m.contains("outside the export")),
        "{r:?}"
    );
    // A reading run's write is refused by the runtime at the target.
    let inside = [Extent {
        file_off: 0,
        dev_off: 0,
        len: 4096,
        unwritten: false,
    }];
    t.device.write_at(&kv_file(64), 0).unwrap();
    let world = RemoteWorld {
        extents: &inside,
        file_size: 4096,
        range: 0..4096,
        writable: false,
    };
    let r = dev.run(&remote, world, &req).unwrap().unwrap();
    assert!(
        (r.result as i64) < 0,
        "a write in a reading run returned {}",
        r.result as i64
    );
    let mut counter = [0u8; 8];
    t.device.read_at(&mut counter, 56).unwrap();
    assert_eq!(u64::from_le_bytes(counter), 0);
}

#[test]
fn the_target_verifies_programs_itself() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(Some(1));
    let remote = RemoteProgram::new("", b"\x7fELF but not really".to_vec());
    let world = RemoteWorld {
        extents: &[],
        file_size: 0,
        range: 0..0,
        writable: false,
    };
    let req = Request::default();
    assert!(matches!(
        dev.run(&remote, world, &req),
        Err(NotAtTarget::Refused(_))
    ));
    // The connection is still good.
    dev.read_at(&mut [0; 512], 0).unwrap();
}

#[test]
fn one_mount_owns_an_export_at_a_time() {
    let t = Target::start(1 << 20, Config::default());
    let first = t.client(Some(11));
    let err = NbdDevice::connect(
        &t.url(),
        Options {
            appcode: Some(22),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    // Plain NBD clients are not mounts; once the owner leaves, another may claim it.
    t.client(None);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    t.client(Some(22));
}

#[test]
fn a_target_that_goes_away_fails_io_and_the_client_reconnects_when_it_is_back() {
    let device = Arc::new(MemDevice::new(1 << 20));
    let t = Target::on(device.clone(), Config::default(), "0");
    let port = t.addr.port();
    let dev = t.client(None);
    dev.write_at(b"before", 0).unwrap();
    drop(t);
    let mut b = [0; 6];
    assert!(dev.read_at(&mut b, 0).is_err());
    let _t = Target::on(device, Config::default(), &port.to_string());
    dev.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"before");
}

/// A raw connection that has done the handshake into transmission with structured
/// replies.
fn raw_transmission(addr: SocketAddr) -> TcpStream {
    let mut s = raw_handshake(addr);
    wire::write_option(&mut s, opt::STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    let mut go = Vec::new();
    go.put_u32(0);
    go.put_u16(0);
    wire::write_option(&mut s, opt::GO, &go).unwrap();
    loop {
        if option_reply(&mut s).0 == rep::ACK {
            return s;
        }
    }
}

fn raw_handshake(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn option_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0; 20];
    s.read_exact(&mut h).unwrap();
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).unwrap();
    (kind, data)
}

/// Whether the server closed the connection (reads end) rather than answering.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn unknown_options_get_err_unsup_and_malformed_ones_err_invalid() {
    let t = Target::start(1 << 20, Config::default());
    let mut s = raw_handshake(t.addr);
    wire::write_option(&mut s, 0x7777, b"whatever").unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ERR_UNSUP);
    wire::write_option(&mut s, opt::GO, &[0, 0, 0, 9, 1]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ERR_INVALID);
    let mut go = Vec::new();
    go.put_u32(4);
    go.extend_from_slice(b"nope");
    go.put_u16(0);
    wire::write_option(&mut s, opt::GO, &go).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ERR_UNKNOWN);
    // The extension needs structured replies first.
    let mut ext = Vec::new();
    ext.put_u32(1);
    ext.put_u64(5);
    wire::write_option(&mut s, opt::NEARFS_APPCODE, &ext).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ERR_INVALID);
    wire::write_option(&mut s, opt::LIST, &[]).unwrap();
    let (kind, data) = option_reply(&mut s);
    assert_eq!((kind, &data[4..]), (rep::SERVER, &b"disk"[..]));
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    wire::write_option(&mut s, opt::ABORT, &[]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    assert!(closed(&mut s));
}

#[test]
fn a_huge_option_closes_the_connection_and_others_go_on() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(None);
    let mut s = raw_handshake(t.addr);
    let mut b = Vec::new();
    b.put_u64(wire::IHAVEOPT);
    b.put_u32(opt::GO);
    b.put_u32(u32::MAX);
    s.write_all(&b).unwrap();
    assert!(closed(&mut s));
    dev.write_at(b"still here", 0).unwrap();
}

#[test]
fn malformed_requests_get_errors_or_a_closed_connection_and_nothing_else_is_hurt() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(None);
    dev.write_at(b"precious", 0).unwrap();
    let request = |kind: u16, flags: u16, offset: u64, length: u32| {
        wire::Request {
            flags,
            kind,
            cookie: 99,
            offset,
            length,
        }
        .encode()
    };
    // Errors that leave the connection usable: a read past the end, a huge read, unknown
    // flags, an unknown command, extension commands never negotiated.
    let mut s = raw_transmission(t.addr);
    for (kind, flags, offset, length, want) in [
        (cmd::READ, 0, 1 << 20, 1, wire::errno::EINVAL),
        (cmd::READ, 0, 0, u32::MAX, wire::errno::EOVERFLOW),
        (cmd::READ, 1 << 9, 0, 512, wire::errno::EINVAL),
        (77, 0, 0, 0, wire::errno::EINVAL),
        (cmd::NEARFS_UNLOAD, 0, 1, 0, wire::errno::EINVAL),
        (
            cmd::WRITE_ZEROES,
            0,
            u64::MAX - 1,
            4096,
            wire::errno::ENOSPC,
        ),
    ] {
        s.write_all(&request(kind, flags, offset, length)).unwrap();
        let mut h = [0; 20];
        s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0; len as usize];
        s.read_exact(&mut body).unwrap();
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), wire::chunk::ERROR);
        assert_eq!(
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            want,
            "command {kind}"
        );
    }
    // A write whose payload is more than the protocol allows: an error, then closed.
    s.write_all(&request(cmd::WRITE, 0, 0, u32::MAX)).unwrap();
    assert!(closed(&mut s));
    // A bad magic, and garbage mid-stream: closed.
    for junk in [&b"GARBAGE GARBAGE GARBAGE GARBAGE!"[..], &[0xff; 28][..]] {
        let mut s = raw_transmission(t.addr);
        s.write_all(junk).unwrap();
        assert!(closed(&mut s));
    }
    // A client that stalls half-way through a write holds only its own connection.
    let mut stalled = raw_transmission(t.addr);
    stalled.write_all(&request(cmd::WRITE, 0, 0, 4096)).unwrap();
    stalled.write_all(&[0xaa; 100]).unwrap();
    let mut b = [0; 8];
    dev.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"precious");
    drop(stalled);
    // A client that stalls in the handshake is dropped when its time is up.
    let quick = Target::start(
        1 << 20,
        Config {
            handshake_timeout: Duration::from_millis(200),
            ..Config::default()
        },
    );
    let mut s = TcpStream::connect(quick.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed(&mut s));
}

#[test]
fn random_bytes_never_take_the_server_down() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(None);
    dev.write_at(b"precious", 0).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut s = if round % 2 == 0 {
            raw_handshake(t.addr)
        } else {
            raw_transmission(t.addr)
        };
        let len = 1 + (seed % 300) as usize;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = closed(&mut s);
    }
    let mut b = [0; 8];
    dev.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"precious");
}

/// A raw connection of the mount with `token`, in transmission.
fn raw_owner(addr: SocketAddr, token: u64) -> TcpStream {
    let mut s = raw_handshake(addr);
    wire::write_option(&mut s, opt::STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    let mut ext = Vec::new();
    ext.put_u32(1);
    ext.put_u64(token);
    wire::write_option(&mut s, opt::NEARFS_APPCODE, &ext).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    let mut go = Vec::new();
    go.put_u32(0);
    go.put_u16(0);
    wire::write_option(&mut s, opt::GO, &go).unwrap();
    while option_reply(&mut s).0 != rep::ACK {}
    s
}

fn header(kind: u16, offset: u64, length: u32) -> [u8; wire::REQUEST_SIZE] {
    wire::Request {
        flags: 0,
        kind,
        cookie: 7,
        offset,
        length,
    }
    .encode()
}

#[test]
fn a_claim_is_given_back_however_the_handshake_ends() {
    let t = Target::start(1 << 20, Config::default());
    // Claimed, then aborted.
    let mut s = raw_handshake(t.addr);
    wire::write_option(&mut s, opt::STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    let mut ext = Vec::new();
    ext.put_u32(1);
    ext.put_u64(0xbad);
    wire::write_option(&mut s, opt::NEARFS_APPCODE, &ext).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    wire::write_option(&mut s, opt::ABORT, &[]).unwrap();
    assert_eq!(option_reply(&mut s).0, rep::ACK);
    assert!(closed(&mut s));
    // Claimed by a mount that named an export the server lacks.
    let wrong = NbdUrl::parse(&format!("nbd://127.0.0.1:{}/nope", t.addr.port()))
        .unwrap()
        .unwrap();
    let options = Options {
        appcode: Some(5),
        ..Options::default()
    };
    let e = NbdDevice::connect(&wrong, options).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    // Neither holds the export now (the server lets go as the connections end).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match NbdDevice::connect(
            &t.url(),
            Options {
                appcode: Some(6),
                ..Options::default()
            },
        ) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the export stayed claimed: {e}"),
        }
    }
}

#[test]
fn stalled_payloads_and_unread_replies_hold_only_their_own_connection() {
    let t = Target::start(64 << 20, Config::default());
    let dev = t.client(None);
    // Sixteen writes of 32 MiB that never send their bytes, and four clients that ask
    // for 32 MiB eight times and never read.
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut s = raw_transmission(t.addr);
        s.write_all(&header(cmd::WRITE, 0, wire::MAX_PAYLOAD))
            .unwrap();
        stalled.push(s);
    }
    for _ in 0..4 {
        let mut s = raw_transmission(t.addr);
        for _ in 0..8 {
            s.write_all(&header(cmd::READ, 0, wire::MAX_PAYLOAD))
                .unwrap();
        }
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    dev.write_at(b"honest", 4096).unwrap();
    let mut b = [0; 6];
    dev.read_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"honest");
}

#[test]
fn the_handshake_has_one_deadline_however_slowly_it_comes() {
    let t = Target::start(
        1 << 20,
        Config {
            handshake_timeout: Duration::from_millis(500),
            ..Config::default()
        },
    );
    let mut s = raw_handshake(t.addr);
    let mut b = Vec::new();
    b.put_u64(wire::IHAVEOPT);
    b.put_u32(0x7777);
    b.put_u32(60_000);
    s.write_all(&b).unwrap();
    // A byte every 100 ms: each read is quick, the handshake never ends. The server
    // closes it; writes then fail and reads end.
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if s.write_all(&[0]).is_err() {
            break;
        }
    }
    assert!(closed(&mut s));
}

#[test]
fn a_run_the_mount_gave_up_on_cannot_land_after_its_next_request() {
    let t = Target::start(8 << 20, Config::default());
    let token = 1;
    let dev = NbdDevice::connect(
        &t.url(),
        Options {
            appcode: Some(token),
            timeout: Duration::from_secs(1),
            connections: 1,
            ..Options::default()
        },
    )
    .unwrap();
    t.device.write_at(&kv_file(64), 1 << 20).unwrap();
    let extents = [Extent {
        file_off: 0,
        dev_off: 1 << 20,
        len: 4096,
        unwritten: false,
    }];
    let object = common::compile_file(&common::progs_dir().join("kv_increment.c"), "v3");
    let remote = RemoteProgram::new("", object);
    let arg = kv_arg(3);
    let req = Request {
        arg: &arg,
        limits: Limits {
            wall: Duration::from_millis(100),
            ..Limits::default()
        },
    };
    let world = || RemoteWorld {
        extents: &extents,
        file_size: 4096,
        range: 0..4096,
        writable: true,
    };
    let counter = || {
        let mut c = [0u8; 8];
        t.device.read_at(&mut c, (1 << 20) + 3 * 64 + 56).unwrap();
        u64::from_le_bytes(c)
    };
    assert_eq!(dev.run(&remote, world(), &req).unwrap().unwrap().result, 31);
    // Connections of the same mount that start RUNs and LOADs and never send their payloads hold
    // the target's memory for runs: the next run waits at the target, and the mount
    // gives up on it.
    // (Nine RUNs of 52 MiB and eight LOADs of 4 MiB leave less than a run needs of the
    // 512 MiB.)
    let mut stalled = Vec::new();
    for i in 0..17 {
        let mut s = raw_owner(t.addr, token);
        let h = if i < 9 {
            header(cmd::NEARFS_RUN, 0, wire::MAX_PAYLOAD)
        } else {
            header(cmd::NEARFS_LOAD, 0, nbd::server::MAX_OBJECT)
        };
        s.write_all(&h).unwrap();
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = dev.run(&remote, world(), &req).unwrap();
    assert!(matches!(r, Err(RunError::Io(_))), "{r:?}");
    // The next request fences: the abandoned run is finished or dropped before it is
    // answered, and nothing changes after.
    let mut b = [0; 8];
    dev.read_at(&mut b, 1 << 20).unwrap();
    // Whatever held the target up lets go now; without the fence the abandoned run would
    // go on from here.
    drop(stalled);
    let after = counter();
    assert!(after == 31 || after == 32, "counter {after}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(), after, "a run the mount gave up on landed later");
}

/// Serves every connection to `l` on a thread of its own with `f`, which ends it by
/// returning (an error too).
fn each_connection(
    l: TcpListener,
    f: impl Fn(TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
) {
    let f = Arc::new(f);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let f = f.clone();
            std::thread::spawn(move || {
                let _ = f(s);
            });
        }
    });
}

/// A fake server's greeting (fixed newstyle), and the client's flags read.
fn greet(s: &mut TcpStream) -> std::io::Result<()> {
    let mut hello = Vec::new();
    hello.put_u64(wire::NBDMAGIC);
    hello.put_u64(wire::IHAVEOPT);
    hello.put_u16(3);
    s.write_all(&hello)?;
    wire::read_u32(s).map(drop)
}

/// The client's next option, read whole; its code.
fn next_option(s: &mut TcpStream) -> std::io::Result<u32> {
    wire::read_u64(s)?;
    let o = wire::read_u32(s)?;
    let len = wire::read_u32(s)?;
    wire::read_vec(s, len, 1 << 20)?;
    Ok(o)
}

/// A minimal NBD server that answers the handshake, then hands each request to `f`.
fn hostile(f: impl Fn(&mut TcpStream, wire::Request) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    each_connection(l, move |mut s| {
        greet(&mut s)?;
        loop {
            let o = next_option(&mut s)?;
            if o == opt::GO {
                let mut b = Vec::new();
                b.put_u16(0);
                b.put_u64(1 << 20);
                b.put_u16(1 | (1 << 8));
                wire::write_option_reply(&mut s, o, rep::INFO, &b)?;
                wire::write_option_reply(&mut s, o, rep::ACK, &[])?;
                break;
            }
            wire::write_option_reply(&mut s, o, rep::ACK, &[])?;
        }
        loop {
            let h = wire::read_array::<28>(&mut s)?;
            let r = wire::Request::decode(&h).unwrap();
            if r.has_payload() {
                wire::read_vec(&mut s, r.length, 1 << 26)?;
            }
            f(&mut s, r);
        }
    });
    addr
}

fn chunk(
    s: &mut TcpStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let h = wire::Chunk {
        flags,
        kind,
        cookie,
        length: data.len() as u32,
    };
    s.write_all(&h.encode())?;
    s.write_all(data)
}

fn hostile_client(addr: SocketAddr, appcode: Option<u64>) -> NbdDevice {
    let url = NbdUrl::parse(&format!("nbd://{addr}/")).unwrap().unwrap();
    let options = Options {
        appcode,
        timeout: Duration::from_secs(1),
        ..Options::default()
    };
    NbdDevice::connect(&url, options).unwrap()
}

#[test]
fn a_server_cannot_hand_back_bytes_it_never_sent() {
    // Two chunks over the same half: the other half would be the caller's old bytes.
    let addr = hostile(|s, r| {
        let mut b = Vec::new();
        b.put_u64(r.offset);
        b.put_u32(r.length / 2);
        let _ = chunk(s, 0, wire::chunk::OFFSET_HOLE, r.cookie, &b);
        let _ = chunk(s, 1, wire::chunk::OFFSET_HOLE, r.cookie, &b);
    });
    let dev = hostile_client(addr, None);
    let mut buf = [0xaa; 8];
    assert!(dev.read_at(&mut buf, 0).is_err(), "accepted: {buf:?}");
}

#[test]
fn a_server_that_never_finishes_a_reply_cannot_hang_the_client() {
    let addr = hostile(|s, r| {
        while chunk(s, 0, wire::chunk::NONE, r.cookie, &[]).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let dev = Arc::new(hostile_client(addr, None));
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dev.clone();
    std::thread::spawn(move || {
        let _ = tx.send(d.read_at(&mut [0; 8], 0).is_err());
    });
    let failed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the read is still waiting after 30 s with a 1 s timeout");
    assert!(failed);
}

#[test]
fn a_server_cannot_send_more_output_than_the_run_allows() {
    let addr = hostile(|s, r| match r.kind {
        cmd::NEARFS_LOAD => {
            let _ = chunk(
                s,
                1,
                wire::chunk::NEARFS_PROGRAM,
                r.cookie,
                &1u64.to_be_bytes(),
            );
        }
        cmd::NEARFS_RUN => {
            let piece = vec![0x55u8; 1 << 20];
            for i in 0..64u64 {
                let mut b = Vec::with_capacity(8 + piece.len());
                b.put_u64(i << 20);
                b.extend_from_slice(&piece);
                if chunk(s, 0, wire::chunk::NEARFS_OUTPUT, r.cookie, &b).is_err() {
                    return;
                }
            }
        }
        _ => {
            let _ = s.write_all(&wire::simple_reply(0, r.cookie));
        }
    });
    let dev = hostile_client(addr, Some(1));
    let remote = RemoteProgram::new("", vec![0; 16]);
    let req = Request {
        arg: &[],
        limits: Limits {
            output_bytes: 1024,
            ..Limits::default()
        },
    };
    let world = RemoteWorld {
        extents: &[],
        file_size: 0,
        range: 0..0,
        writable: false,
    };
    let r = dev.run(&remote, world, &req).unwrap();
    assert!(matches!(r, Err(RunError::Io(_))), "{r:?}");
}

#[test]
fn a_pinned_device_refuses_a_target_that_came_back_with_another_image() {
    let device = Arc::new(MemDevice::new(1 << 20));
    device.write_at(b"uuid-one", 16).unwrap();
    let t = Target::on(device.clone(), Config::default(), "0");
    let port = t.addr.port();
    let dev = t.client(None);
    dev.pin(16, 8).unwrap();
    drop(t);
    // Another image of the same size at the same address: nothing is read or written.
    let other = Arc::new(MemDevice::new(1 << 20));
    other.write_at(b"uuid-two", 16).unwrap();
    let t = Target::on(other.clone(), Config::default(), &port.to_string());
    let e = dev.write_at(b"late", 4096).unwrap_err();
    assert!(e.to_string().contains("another filesystem"), "{e}");
    let mut b = [0; 4];
    other.read_at(&mut b, 4096).unwrap();
    assert_eq!(&b, &[0; 4]);
    drop(t);
    // The right one again: served as before.
    let _t = Target::on(device.clone(), Config::default(), &port.to_string());
    dev.write_at(b"late", 4096).unwrap();
    device.read_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"late");
}

#[test]
fn only_the_owning_mount_can_send_extension_payloads() {
    let t = Target::start(8 << 20, Config::default());
    // Twenty connections without the extension each announce a RUN of 32 MiB: each is
    // refused and closed before anything is set aside for it.
    let mut others = Vec::new();
    for _ in 0..20 {
        let mut s = raw_transmission(t.addr);
        s.write_all(&header(cmd::NEARFS_RUN, 0, wire::MAX_PAYLOAD))
            .unwrap();
        others.push(s);
    }
    for s in &mut others {
        let mut h = [0; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), wire::chunk::ERROR);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0; len as usize];
        s.read_exact(&mut body).unwrap();
        assert_eq!(
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            wire::errno::EINVAL
        );
        assert!(closed(s));
    }
    // The mount's runs are served as before.
    let dev = t.client(Some(1));
    t.device.write_at(&kv_file(64), 0).unwrap();
    let extents = [Extent {
        file_off: 0,
        dev_off: 0,
        len: 4096,
        unwritten: false,
    }];
    let object = common::compile_file(&common::progs_dir().join("kv_increment.c"), "v3");
    let remote = RemoteProgram::new("", object);
    let arg = kv_arg(2);
    let req = Request {
        arg: &arg,
        limits: Limits::default(),
    };
    let world = RemoteWorld {
        extents: &extents,
        file_size: 4096,
        range: 0..4096,
        writable: true,
    };
    assert_eq!(dev.run(&remote, world, &req).unwrap().unwrap().result, 21);
}

#[test]
fn a_client_that_never_reads_its_replies_is_made_to_wait() {
    let t = Target::start(1 << 20, Config::default());
    let dev = t.client(None);
    // Reads of 1 MiB, pipelined, replies never read: once the replies fill the sockets,
    // the server reads no more requests, so the client's sending blocks long before its
    // million requests (28 MB) are sent, instead of the server queueing them all.
    let mut s = raw_transmission(t.addr);
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| header(cmd::READ, 0, 1 << 20))
        .collect();
    let mut sent = 0;
    let blocked = loop {
        if sent == 1000 {
            break false;
        }
        if s.write_all(&batch).is_err() {
            break true;
        }
        sent += 1;
    };
    assert!(
        blocked,
        "the server took all {sent}000 requests without a reply being read"
    );
    // Others are served meanwhile.
    let mut b = [0; 8];
    dev.read_at(&mut b, 0).unwrap();
}

#[test]
fn a_server_that_never_finishes_its_handshake_cannot_hang_a_connect() {
    // One answers GO with INFO replies for ever; one sends its greeting a byte at a time.
    let endless = TcpListener::bind("127.0.0.1:0").unwrap();
    let trickle = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = [endless.local_addr().unwrap(), trickle.local_addr().unwrap()];
    each_connection(endless, |mut s| {
        greet(&mut s)?;
        loop {
            let o = next_option(&mut s)?;
            if o != opt::GO {
                wire::write_option_reply(&mut s, o, rep::ERR_UNSUP, &[])?;
                continue;
            }
            let mut b = Vec::new();
            b.put_u16(wire::info::NAME);
            loop {
                wire::write_option_reply(&mut s, o, rep::INFO, &b)?;
            }
        }
    });
    each_connection(trickle, |mut s| {
        for b in b"NBDMAGICIHAVEOPT".iter().cycle() {
            std::thread::sleep(Duration::from_millis(200));
            s.write_all(&[*b])?;
        }
        Ok(())
    });
    for addr in addrs {
        let url = NbdUrl::parse(&format!("nbd://{addr}/")).unwrap().unwrap();
        let options = Options {
            timeout: Duration::from_secs(1),
            ..Options::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(NbdDevice::connect(&url, options).is_err());
        });
        let failed = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("connecting is still waiting after 30 s with a 1 s timeout");
        assert!(failed, "{addr}");
    }
}
