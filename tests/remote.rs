//! nearfs over NBD: the tools people use against `nearfs serve`; mounts over `nearfs serve`,
//! qemu-nbd and nbdkit that give the same answers, at the target or in the daemon; and a
//! target that dies or stops answering under a mount.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use nearfs_client::Run;
use nearfs_client::layouts::kv;
use nearfs_tests::*;

use super::load_example;

/// How long a test waits for something that should happen promptly, before it calls it
/// a hang. Generous: the machine may be loaded; nothing here measures speed.
const PATIENCE: Duration = Duration::from_secs(120);

/// Both streams of a finished tool, for assertions and their messages.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (scripts/setup.sh installs it): {e}"))
}

/// `qemu-io -f raw -c CMD... URL`.
fn qemu_io(url: &str, cmds: &[&str]) -> Output {
    qemu_io_with(&[], url, cmds)
}

/// `qemu-io -f raw OPTIONS -c CMD... URL`.
fn qemu_io_with(options: &[&str], url: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw"];
    args.extend(options);
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(url);
    tool("qemu-io", &args)
}

/// The value of `key=` in a space-separated view such as `user.nearfs.fs`.
fn field<'a>(view: &'a str, key: &str) -> Option<&'a str> {
    view.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn number(view: &str, key: &str) -> u64 {
    field(view, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {view}"))
}

fn view(path: &Path, name: &str) -> String {
    String::from_utf8(getxattr(path, name).unwrap_or_else(|e| panic!("{name}: errno {e}"))).unwrap()
}

/// Writes `data` to a new file and makes it durable.
fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Reads a file after dropping its pages from the kernel's cache, so that the read
/// reaches the daemon and its device.
fn read_uncached(path: &Path) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    // SAFETY: posix_fadvise takes an open descriptor and integers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise: {}", io::Error::from_raw_os_error(rc));
    let mut data = Vec::new();
    (&f).read_to_end(&mut data)?;
    Ok(data)
}

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

#[test]
fn remote_nbd_tools_read_write_and_copy_a_nearfs_serve_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plain.img");
    let mut model = pattern(21, 16 << 20);
    fs::write(&image, &model).unwrap();
    let mut target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let url = target.url();

    let out = tool("nbdinfo", &["--list", &url]);
    assert_ok(&out);
    let listed = said(&out);
    for want in [
        "export=\"disk\"",
        "export-size: 16777216",
        "is_read_only: false",
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
    ] {
        assert!(listed.contains(want), "{want}: {listed}");
    }

    // Writes with a pattern, checked back; a discard; zeroes written, read back as zeros.
    let out = qemu_io(
        &url,
        &[
            "write -P 0xa5 1M 256k",
            "flush",
            "read -P 0xa5 1M 256k",
            "discard 2M 64k",
            "write -z 1152k 64k",
            "read -P 0 1152k 64k",
            "read -P 0xa5 1M 128k",
            "read -P 0xa5 1216k 64k",
        ],
    );
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("verification failed"), "{text}");
    for want in [
        "wrote 262144/262144 bytes at offset 1048576",
        "read 262144/262144 bytes at offset 1048576",
        "discard 65536/65536 bytes at offset 2097152",
        "wrote 65536/65536 bytes at offset 1179648",
        "read 65536/65536 bytes at offset 1179648",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // A pattern check that must fail does: qemu-io's status is a real verdict.
    let out = qemu_io(&url, &["read -P 0x5a 1M 4k"]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("verification failed"), "{}", said(&out));

    // nbdcopy of the whole export is the image, and the image is what was written (a
    // discarded range may read as anything).
    let copy = dir.path().join("copy.img");
    let out = tool("nbdcopy", &[&url, copy.to_str().unwrap()]);
    assert_ok(&out);
    let copied = fs::read(&copy).unwrap();
    let on_disk = fs::read(&image).unwrap();
    assert!(copied == on_disk, "nbdcopy's copy differs from the image");
    model[1 << 20..(1 << 20) + (256 << 10)].fill(0xa5);
    model[1152 << 10..(1152 + 64) << 10].fill(0);
    let discarded = 2 << 20..(2 << 20) + (64 << 10);
    assert!(copied[..discarded.start] == model[..discarded.start]);
    assert!(copied[discarded.end..] == model[discarded.end..]);
    target.stop();

    // A read-only export says so and refuses writes; the image stays as it was.
    let target = NbdTarget::start(NbdServer::Nearfs, &image, &["--read-only"]);
    let out = tool("nbdinfo", &[&target.url()]);
    assert_ok(&out);
    assert!(said(&out).contains("is_read_only: true"), "{}", said(&out));
    // qemu-io refuses to open it for writing, and reads it when asked read-only.
    let out = qemu_io(&target.url(), &["write -P 0x11 0 4k"]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(!said(&out).contains("wrote"), "{}", said(&out));
    let out = qemu_io_with(&["-r"], &target.url(), &["read -P 0xa5 1M 4k"]);
    assert!(out.status.success(), "{}", said(&out));
    drop(target);
    assert!(fs::read(&image).unwrap() == on_disk);
}

/// What one mount answered, for comparing mounts over different servers.
#[derive(Debug, PartialEq)]
struct Answers {
    search: Vec<u64>,
    counters: Vec<u64>,
}

#[test]
fn remote_runs_answer_alike_over_nearfs_serve_qemu_nbd_and_nbdkit() {
    let (_dir, image, _) = made_image("64M");
    // 100 000 sorted keys (800 KB): a search takes several hops.
    let keys: Vec<u64> = (0..100_000u64).map(|i| i * 5 + 3).collect();
    let sorted: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let mut probes: Vec<u64> = keys.iter().step_by(7919).copied().collect();
    probes.extend([keys[0], keys[keys.len() - 1], 0, 4, keys[500] + 1, u64::MAX]);
    let want: Vec<u64> = probes
        .iter()
        .map(|k| keys.binary_search(k).map_or(u64::MAX, |i| i as u64))
        .collect();
    let key = [7u8; kv::KEY];
    let slot = 2u64;
    let table: Vec<u8> = (0..4u8)
        .flat_map(|k| {
            kv::record(
                &if u64::from(k) == slot {
                    key
                } else {
                    [k; kv::KEY]
                },
                0,
            )
        })
        .collect();
    let counter_now = |path: &Path| {
        let bytes = fs::read(path).unwrap();
        kv::counter(&bytes[slot as usize * kv::SIZE..(slot as usize + 1) * kv::SIZE])
    };

    let mut answers = Vec::new();
    for server in [NbdServer::Nearfs, NbdServer::QemuNbd, NbdServer::Nbdkit] {
        let mut target = NbdTarget::start(server, &image, &[]);
        let mut t = TestFs::over_nbd(&target.url(), "");
        if server == NbdServer::Nearfs {
            write_durably(&t.path("sorted.u64"), &sorted).unwrap();
            write_durably(&t.path("counters.kv"), &table).unwrap();
        }
        let search = load_example(&t, "bsearch");
        let incr = load_example(&t, "kv_increment");

        let arr = File::open(t.path("sorted.u64")).unwrap();
        let search_answers: Vec<u64> = probes
            .iter()
            .map(|k| {
                nearfs_client::run(&arr, &Run::new(search).arg(&k.to_le_bytes()))
                    .unwrap_or_else(|e| panic!("{server:?}: bsearch {k}: {e}"))
                    .result
            })
            .collect();
        assert_eq!(search_answers, want, "{server:?}");

        // Increments where the target (or the daemon) writes; read() sees each one,
        // also with the file's pages in the kernel's cache from before.
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path("counters.kv"))
            .unwrap();
        let before = counter_now(&t.path("counters.kv"));
        let mut counters = Vec::new();
        for _ in 0..3 {
            let out =
                nearfs_client::run(&rw, &Run::new(incr).arg(&kv::arg(slot, &key)).write(true))
                    .unwrap_or_else(|e| panic!("{server:?}: kv_increment: {e}"));
            assert_eq!(
                out.result,
                counter_now(&t.path("counters.kv")),
                "{server:?}"
            );
            counters.push(out.result - before);
        }
        // The wrong key in the slot: nothing is written.
        let out = nearfs_client::run(
            &rw,
            &Run::new(incr)
                .arg(&kv::arg(slot, &[8; kv::KEY]))
                .write(true),
        )
        .unwrap();
        assert_eq!(out.result as i64, -2, "{server:?}");
        assert_eq!(
            counter_now(&t.path("counters.kv")),
            before + 3,
            "{server:?}"
        );
        // The records around it are untouched.
        let now = fs::read(t.path("counters.kv")).unwrap();
        assert!(now[..slot as usize * kv::SIZE] == table[..slot as usize * kv::SIZE]);
        assert!(now[(slot as usize + 1) * kv::SIZE..] == table[(slot as usize + 1) * kv::SIZE..]);
        answers.push(Answers {
            search: search_answers,
            counters,
        });

        // Where the runs ran, and what went over the wire.
        let facts = view(&t.mnt, "user.nearfs.fs");
        assert_eq!(
            field(&facts, "device"),
            Some(target.url().as_str()),
            "{facts}"
        );
        let at_target = server == NbdServer::Nearfs;
        assert_eq!(
            field(&facts, "target_offload"),
            Some(if at_target { "yes" } else { "no" }),
            "{server:?}: {facts}"
        );
        assert!(number(&facts, "nbd_requests") > 0, "{facts}");
        assert!(number(&facts, "nbd_bytes") > 0, "{facts}");
        let searched = view(&t.path("sorted.u64"), "user.nearfs.stats");
        let counted = view(&t.path("counters.kv"), "user.nearfs.stats");
        assert_eq!(number(&searched, "runs"), probes.len() as u64, "{searched}");
        assert_eq!(number(&counted, "runs"), 4, "{counted}");
        let (remote_searched, remote_counted) = if at_target {
            (probes.len() as u64, 4)
        } else {
            (0, 0)
        };
        assert_eq!(
            number(&searched, "remote_runs"),
            remote_searched,
            "{server:?}: {searched}"
        );
        assert_eq!(
            number(&counted, "remote_runs"),
            remote_counted,
            "{server:?}: {counted}"
        );
        // One more run at the target counts once more; in the daemon, never.
        nearfs_client::run(&arr, &Run::new(search).arg(&keys[1].to_le_bytes())).unwrap();
        let searched = view(&t.path("sorted.u64"), "user.nearfs.stats");
        assert_eq!(
            number(&searched, "remote_runs"),
            remote_searched + u64::from(at_target),
            "{server:?}: {searched}"
        );

        drop((arr, rw));
        t.unmount();
        target.stop();
    }
    assert_eq!(answers[0], answers[1], "nearfs serve and qemu-nbd");
    assert_eq!(answers[0], answers[2], "nearfs serve and nbdkit");
    // Mounted over three servers in turn, the image checks clean.
    let out = nearfs(&["fsck", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
}

#[test]
fn remote_files_written_through_a_mount_read_back_after_remount() {
    let (_dir, image, local_mnt) = made_image("64M");
    let target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let mut t = TestFs::over_nbd(&target.url(), "");
    let files: Vec<(String, Vec<u8>)> = [0usize, 1, 4097, (3 << 20) + 123]
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("d/f{i}"), pattern(40 + i as u64, n)))
        .collect();
    fs::create_dir(t.path("d")).unwrap();
    for (name, data) in &files {
        fs::write(t.path(name), data).unwrap();
    }
    std::os::unix::fs::symlink("f3", t.path("d/link")).unwrap();
    // No fsync: unmounting commits.
    t.unmount();
    let out = nearfs(&["fsck", &target.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    t.mount("");
    for (name, data) in &files {
        assert!(fs::read(t.path(name)).unwrap() == *data, "{name}");
    }
    assert!(fs::read(t.path("d/link")).unwrap() == files[3].1);
    t.unmount();
    drop(target);

    // The bytes are in the image itself: mounted directly, it holds the same files.
    let (img, mnt) = (image.to_str().unwrap(), local_mnt.to_str().unwrap());
    assert_ok(&nearfs(&["mount", img, mnt, "-o", "ro"]));
    let back: Vec<_> = files
        .iter()
        .map(|(name, _)| fs::read(local_mnt.join(name)))
        .collect();
    assert!(
        Command::new("umount")
            .arg(&local_mnt)
            .status()
            .unwrap()
            .success()
    );
    for ((name, data), got) in files.iter().zip(back) {
        assert!(got.unwrap() == *data, "{name}");
    }
}

#[test]
fn remote_mkfs_fsck_and_info_work_on_an_export_of_another_server() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("blank.img");
    File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let target = NbdTarget::start(NbdServer::Nbdkit, &image, &[]);
    let url = target.url();
    let out = nearfs(&["mkfs", &url]);
    assert_ok(&out);
    assert!(said(&out).contains("formatted"), "{}", said(&out));
    let out = nearfs(&["mkfs", &url]);
    assert!(!out.status.success());
    assert!(said(&out).contains("--force"), "{}", said(&out));
    let out = nearfs(&["mkfs", &url, "--size", "1G"]);
    assert!(!out.status.success());
    assert!(
        said(&out).contains("size its server gives it"),
        "{}",
        said(&out)
    );
    let out = nearfs(&["info", &url]);
    assert_ok(&out);
    let info = said(&out);
    assert!(
        info.contains("format version:      1") && info.contains("device size:         64.0 MiB"),
        "{info}"
    );
    let out = nearfs(&["fsck", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    // It mounts there, and holds what is written.
    let mut t = TestFs::over_nbd(&url, "nbd_connections=2,nbd_delay=100");
    fs::write(t.path("f"), b"over nbdkit").unwrap();
    let facts = view(&t.mnt, "user.nearfs.fs");
    assert_eq!(field(&facts, "target_offload"), Some("no"), "{facts}");
    t.unmount();
    let out = nearfs(&["fsck", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    t.mount("");
    assert_eq!(fs::read(t.path("f")).unwrap(), b"over nbdkit");
}

#[test]
fn remote_an_export_of_nearfs_serve_has_one_mount_at_a_time() {
    let (_dir, image, other) = made_image("64M");
    let target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let mut t = TestFs::over_nbd(&target.url(), "");
    fs::write(t.path("f"), b"first mount").unwrap();
    // A second nearfs would write the same metadata behind the first one's back.
    let out = nearfs(&["mount", &target.url(), other.to_str().unwrap()]);
    if out.status.success() {
        let _ = Command::new("umount").arg(&other).status();
        panic!("a second mount of the export succeeded");
    }
    assert!(said(&out).contains("another nearfs"), "{}", said(&out));
    assert!(!is_mounted(&other));
    // Its claim ends with the mount.
    t.unmount();
    let second = TestFs::over_nbd(&target.url(), "");
    assert_eq!(fs::read(second.path("f")).unwrap(), b"first mount");
}

#[test]
fn remote_target_killed_mid_write_fails_io_and_fsck_is_clean_after_restart() {
    let (_dir, image, _) = made_image("128M");
    let mut target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let mut t = TestFs::over_nbd(&target.url(), "nbd_timeout=5");
    let kept: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| {
            (
                format!("kept{i}"),
                pattern(100 + i, (i as usize + 1) * 300_000),
            )
        })
        .collect();
    for (name, data) in &kept {
        write_durably(&t.path(name), data).unwrap();
    }

    // A writer that keeps writing and syncing (16 MiB over and over) until an error.
    let (started_tx, started) = mpsc::channel();
    let (ended_tx, ended) = mpsc::channel();
    let path = t.path("growing");
    let writer = std::thread::spawn(move || {
        let result = (|| -> io::Result<()> {
            let mut f = File::create(&path)?;
            let chunk = vec![0x5a; 256 << 10];
            for round in 0u64.. {
                if round % 64 == 0 {
                    f.seek(SeekFrom::Start(0))?;
                }
                f.write_all(&chunk)?;
                f.sync_data()?;
                if round == 1 {
                    let _ = started_tx.send(());
                }
            }
            Ok(())
        })();
        let _ = ended_tx.send(result);
    });
    started
        .recv_timeout(PATIENCE)
        .expect("the writer wrote and synced");
    target.kill();
    // The writer's next write or sync fails with EIO: it does not hang.
    let result = ended
        .recv_timeout(PATIENCE)
        .expect("I/O on the mount did not fail after the target died");
    let err = result.expect_err("the writer cannot succeed");
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
    writer.join().unwrap();
    // So does other I/O that needs the device.
    let err = write_durably(&t.path("after_crash"), b"lost").unwrap_err();
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
    let err = read_uncached(&t.path("kept0")).unwrap_err();
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");

    // Unmounted with the target gone (the final commit fails), the target back on the
    // same image: fsck finds it clean, and every fsynced file is intact.
    t.unmount();
    assert!(!is_mounted(&t.mnt));
    target.restart();
    let out = nearfs(&["fsck", &target.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    t.mount("nbd_timeout=5");
    for (name, data) in &kept {
        assert!(fs::read(t.path(name)).unwrap() == *data, "{name}");
    }
    // And it takes writes again.
    write_durably(&t.path("after_restart"), b"again").unwrap();
    t.unmount();
    let out = nearfs(&["fsck", &target.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
}

#[test]
fn remote_mount_reconnects_when_its_target_comes_back() {
    let (_dir, image, _) = made_image("64M");
    let mut target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let mut t = TestFs::over_nbd(&target.url(), "nbd_timeout=5");
    let data = pattern(5, 2 << 20);
    write_durably(&t.path("before"), &data).unwrap();
    let sevens = data.iter().filter(|&&b| b == 7).count() as u64;
    let count = load_example(&t, "bytecount");
    let f = File::open(t.path("before")).unwrap();
    let run_count = |f: &File| nearfs_client::run(f, &Run::new(count).arg(&[7]));
    assert_eq!(run_count(&f).unwrap().result, sevens);

    target.kill();
    let err = read_uncached(&t.path("before")).unwrap_err();
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
    // A run at the target that went away fails as a run, with EIO.
    match run_count(&f) {
        Err(nearfs_client::Error::RunFailed { kind, .. }) => {
            assert_eq!(kind, nearfs_client::abi::run_error::IO)
        }
        other => panic!("{other:?}"),
    }

    // Back on the same port: the same mount reads, writes and runs again.
    target.restart();
    assert!(read_uncached(&t.path("before")).unwrap() == data);
    write_durably(&t.path("after"), b"after the restart").unwrap();
    assert_eq!(run_count(&f).unwrap().result, sevens);
    // Every run went to the target, the one while it was away too (and failed there).
    let stats = view(&t.path("before"), "user.nearfs.stats");
    assert_eq!(number(&stats, "runs"), 3, "{stats}");
    assert_eq!(number(&stats, "failures"), 1, "{stats}");
    assert_eq!(number(&stats, "remote_runs"), 3, "{stats}");
    let facts = view(&t.mnt, "user.nearfs.fs");
    assert!(number(&facts, "nbd_connects") >= 2, "{facts}");

    // A restart the mount does not see (no I/O while the target is away) costs nothing:
    // connections the old target closed are not used again.
    target.kill();
    target.restart();
    write_durably(&t.path("after2"), b"after a quiet restart").unwrap();
    assert!(read_uncached(&t.path("before")).unwrap() == data);
    target.kill();
    target.restart();
    assert_eq!(run_count(&f).unwrap().result, sevens);
    drop(f);

    t.unmount();
    let out = nearfs(&["fsck", &target.url()]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    t.mount("");
    assert!(fs::read(t.path("before")).unwrap() == data);
    assert_eq!(fs::read(t.path("after")).unwrap(), b"after the restart");
    assert_eq!(
        fs::read(t.path("after2")).unwrap(),
        b"after a quiet restart"
    );
}

#[test]
fn remote_a_target_that_stops_answering_times_out_with_eio() {
    let (_dir, image, _) = made_image("64M");
    let target = NbdTarget::start(NbdServer::Nearfs, &image, &[]);
    let t = TestFs::over_nbd(&target.url(), "nbd_timeout=5");
    let data = pattern(6, 1 << 20);
    write_durably(&t.path("f"), &data).unwrap();

    // Stopped, the target holds its connections open and answers nothing: requests time
    // out (nbd_timeout) instead of waiting for ever.
    target.signal(libc::SIGSTOP);
    let (tx, rx) = mpsc::channel();
    let path = t.path("f");
    std::thread::spawn(move || {
        let _ = tx.send(read_uncached(&path));
    });
    let result = rx
        .recv_timeout(PATIENCE)
        .expect("a read from a target that stopped answering hangs");
    target.signal(libc::SIGCONT);
    let err = result.expect_err("the target answered while stopped");
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
    // Going on, it answers again.
    assert!(read_uncached(&t.path("f")).unwrap() == data);
}
