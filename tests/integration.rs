//! nearfs mounted through FUSE and driven the way programs drive a filesystem.
//! Needs root and /dev/fuse (as in CI).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nearfs_tests::*;

/// nearfs over NBD: `nearfs serve`, qemu-nbd and nbdkit.
mod remote;

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Parses `user.nearfs.extents` into (file offset, device offset, length, written).
fn extents_of(path: &Path) -> Vec<(u64, u64, u64, bool)> {
    let text =
        String::from_utf8(getxattr(path, "user.nearfs.extents").expect("extents view")).unwrap();
    text.split("; ")
        .filter(|s| !s.is_empty())
        .map(|e| {
            let words: Vec<&str> = e.split(' ').collect();
            let num = |k: &str| -> u64 {
                words
                    .iter()
                    .find_map(|w| w.strip_prefix(k))
                    .expect("field")
                    .parse()
                    .expect("number")
            };
            (
                num("file="),
                num("dev="),
                num("len="),
                words[3] == "written",
            )
        })
        .collect()
}

#[test]
fn files_round_trip_and_show_their_extents() {
    let t = TestFs::new("128M", "");
    let sizes = [0usize, 1, 4095, 4096, 4097, 1 << 20, (8 << 20) + 123];
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(i as u64, n);
        fs::write(t.path(&format!("f{i}")), &data).unwrap();
        assert_eq!(
            fs::read(t.path(&format!("f{i}"))).unwrap(),
            data,
            "size {n}"
        );
        let ext = extents_of(&t.path(&format!("f{i}")));
        let total: u64 = ext.iter().map(|e| e.2).sum();
        assert_eq!(total, (n as u64).div_ceil(4096) * 4096, "size {n}: {ext:?}");
    }
    // A file written sequentially is one extent.
    assert_eq!(extents_of(&t.path("f6")).len(), 1);
    let names = listxattr(&t.path("f6"));
    assert!(
        names.contains(&"user.nearfs.extents".to_string()),
        "{names:?}"
    );
    let facts = String::from_utf8(getxattr(&t.mnt, "user.nearfs.fs").unwrap()).unwrap();
    assert!(
        facts.contains("format_version=1") && facts.contains("block_size=4096"),
        "{facts}"
    );
    // getfattr -d -m - shows the views to a person.
    let out = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(t.path("f6"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("user.nearfs.extents=\"file=0 dev="));
}

#[test]
fn data_persists_across_remount_and_fsck_stays_clean() {
    let mut t = TestFs::new("64M", "");
    fs::create_dir_all(t.path("a/b/c")).unwrap();
    let data = pattern(7, 3 << 20);
    fs::write(t.path("a/b/c/data"), &data).unwrap();
    std::os::unix::fs::symlink("b/c/data", t.path("a/link")).unwrap();
    let f = File::open(t.path("a/b/c/data")).unwrap();
    f.sync_all().unwrap();
    t.unmount();
    let out = nearfs(&["fsck", t.image.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    t.mount("");
    assert_eq!(fs::read(t.path("a/link")).unwrap(), data);
    assert_eq!(
        fs::read_link(t.path("a/link")).unwrap().to_str(),
        Some("b/c/data")
    );
}

/// Whether this kernel lets FUSE filesystems serve requests over io_uring.
fn kernel_offers_uring() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

/// The `fuse=` word of the mount's `user.nearfs.fs`.
fn fuse_transport(t: &TestFs) -> String {
    let facts = String::from_utf8(getxattr(&t.mnt, "user.nearfs.fs").unwrap()).unwrap();
    facts
        .split(' ')
        .find_map(|w| w.strip_prefix("fuse="))
        .expect("user.nearfs.fs names the transport")
        .to_string()
}

#[test]
fn namespace_operations_follow_posix() {
    // Over /dev/fuse, then over io_uring if the kernel offers it.
    let uring = if kernel_offers_uring() {
        "io_uring"
    } else {
        "dev"
    };
    for (options, transport) in [("", "dev"), ("uring", uring)] {
        let t = TestFs::new("64M", options);
        assert_eq!(fuse_transport(&t), transport, "with -o {options:?}");
        namespace_operations(&t);
    }
}

fn namespace_operations(t: &TestFs) {
    fs::write(t.path("x"), b"x").unwrap();
    fs::hard_link(t.path("x"), t.path("y")).unwrap();
    assert_eq!(fs::metadata(t.path("x")).unwrap().nlink(), 2);
    fs::create_dir(t.path("d")).unwrap();
    fs::rename(t.path("y"), t.path("d/y")).unwrap();
    let mut names: Vec<_> = fs::read_dir(&t.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "x"]);
    assert_eq!(
        errno_of(&fs::remove_dir(t.path("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    let long = "n".repeat(256);
    assert_eq!(
        errno_of(&File::create(t.path(&long)).unwrap_err()),
        libc::ENAMETOOLONG
    );

    // renameat2: NOREPLACE and EXCHANGE.
    let rename2 = |a: &str, b: &str, flags: u32| -> i32 {
        let a = CString::new(t.path(a).as_os_str().as_bytes()).unwrap();
        let b = CString::new(t.path(b).as_os_str().as_bytes()).unwrap();
        // SAFETY: both paths are NUL-terminated C strings.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        };
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap()
        }
    };
    assert_eq!(rename2("x", "d", libc::RENAME_NOREPLACE), libc::EEXIST);
    assert_eq!(rename2("x", "d", libc::RENAME_EXCHANGE), 0);
    assert!(t.path("x").is_dir() && t.path("d").is_file());

    // chmod, truncate both ways, utimens.
    fs::set_permissions(t.path("d"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(t.path("d")).unwrap().mode() & 0o7777, 0o600);
    let f = OpenOptions::new().write(true).open(t.path("d")).unwrap();
    f.set_len(10_000).unwrap();
    f.set_len(3).unwrap();
    f.set_len(5000).unwrap();
    let content = fs::read(t.path("d")).unwrap();
    assert_eq!(&content[..1], b"x");
    assert!(content[1..].iter().all(|&b| b == 0));
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_modified(when))
        .unwrap();
    let m = fs::metadata(t.path("d")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
}

#[test]
fn fallocate_punch_hole_and_seek_data() {
    let t = TestFs::new("64M", "");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(t.path("f"))
        .unwrap();
    f.write_all(&vec![0xAA; 64 * 1024]).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4096,
            8192,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20) };
    assert_eq!(r, 0);
    assert_eq!(f.metadata().unwrap().len(), 64 * 1024);
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    // SAFETY: as above.
    let data = unsafe { libc::lseek(fd, 4096, libc::SEEK_DATA) };
    assert_eq!((hole, data), (4096, 12288));
    let mut buf = vec![0u8; 64 * 1024];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf[4096..12288].iter().all(|&b| b == 0));
    assert!(buf[..4096].iter().chain(&buf[12288..]).all(|&b| b == 0xAA));
    let ext = extents_of(&t.path("f"));
    assert!(
        ext.iter().any(|e| !e.3),
        "preallocated extent is unwritten: {ext:?}"
    );
}

#[test]
fn user_xattrs_persist_and_views_are_read_only() {
    let mut t = TestFs::new("64M", "");
    fs::write(t.path("f"), b"").unwrap();
    setxattr(&t.path("f"), "user.color", b"blue").unwrap();
    assert_eq!(
        setxattr(&t.path("f"), "user.nearfs.extents", b"x"),
        Err(libc::EPERM)
    );
    assert_eq!(getxattr(&t.path("f"), "user.none"), Err(libc::ENODATA));
    t.unmount();
    t.mount("");
    assert_eq!(getxattr(&t.path("f"), "user.color").unwrap(), b"blue");
    let out = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(t.path("f"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("user.color=\"blue\"") && shown.contains("user.nearfs.extents"),
        "{shown}"
    );
}

#[test]
fn two_users_share_a_mount_safely_through_allow_other() {
    let t = TestFs::new("64M", "allow_other");
    fs::create_dir(t.path("tmp")).unwrap();
    fs::set_permissions(t.path("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    let tmp = t.path("tmp");
    let tmp = tmp.to_str().unwrap();
    // nobody (65534) creates a file; daemon (1) may read it but not change or delete it.
    let out = sh_as(
        65534,
        65534,
        &[],
        &format!("echo mine > {tmp}/n && chmod 644 {tmp}/n"),
    );
    assert_ok(&out);
    let m = fs::metadata(t.path("tmp/n")).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    assert!(sh_as(1, 1, &[], &format!("cat {tmp}/n")).status.success());
    let w = sh_as(1, 1, &[], &format!("echo theirs > {tmp}/n"));
    assert!(
        !w.status.success(),
        "write to another user's 0644 file succeeded"
    );
    let rm = sh_as(1, 1, &[], &format!("rm -f {tmp}/n"));
    assert!(
        !rm.status.success() && t.path("tmp/n").exists(),
        "sticky directory let another user delete"
    );
    assert_eq!(fs::read(t.path("tmp/n")).unwrap(), b"mine\n");
    // A supplementary group grants group access; without it, none.
    fs::write(t.path("tmp/g"), b"group data").unwrap();
    std::os::unix::fs::chown(t.path("tmp/g"), Some(0), Some(4242)).unwrap();
    fs::set_permissions(t.path("tmp/g"), fs::Permissions::from_mode(0o640)).unwrap();
    assert!(
        sh_as(1, 1, &[4242], &format!("cat {tmp}/g"))
            .status
            .success()
    );
    assert!(!sh_as(1, 1, &[], &format!("cat {tmp}/g")).status.success());
    // Unprivileged users cannot give files away.
    let out = sh_as(65534, 65534, &[], &format!("chown 1 {tmp}/n"));
    assert!(!out.status.success());
}

#[test]
fn a_full_device_gives_enospc_and_keeps_existing_data() {
    let mut t = TestFs::new("24M", "");
    let keep = pattern(3, 1 << 20);
    fs::write(t.path("keep"), &keep).unwrap();
    let mut f = File::create(t.path("fill")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let err = loop {
        if let Err(e) = f.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    drop(f);
    assert_eq!(fs::read(t.path("keep")).unwrap(), keep);
    fs::remove_file(t.path("fill")).unwrap();
    fs::write(t.path("after"), &chunk).unwrap();
    t.unmount();
    let out = nearfs(&["fsck", t.image.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn read_only_mounts_refuse_writes() {
    let mut t = TestFs::new("64M", "");
    fs::write(t.path("f"), b"data").unwrap();
    t.unmount();
    t.mount("ro");
    assert_eq!(fs::read(t.path("f")).unwrap(), b"data");
    assert_eq!(
        errno_of(&fs::write(t.path("g"), b"x").unwrap_err()),
        libc::EROFS
    );
}

#[test]
fn damaged_images_are_refused_with_a_clear_message() {
    let mut t = TestFs::new("32M", "");
    t.unmount();
    let image = t.image.to_str().unwrap().to_string();
    let mut bytes = fs::read(&t.image).unwrap();
    bytes[300] ^= 0x55;
    fs::write(&t.image, &bytes).unwrap();
    let out = nearfs(&["mount", &image, t.mnt.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&t.mnt));
    let out = nearfs(&["fsck", &image]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("checksum"));

    let other = t.dir.path().join("zeros.img");
    fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let out = nearfs(&["mount", other.to_str().unwrap(), t.mnt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong magic"));
    let out = nearfs(&["mkfs", &image]);
    assert!(
        !out.status.success(),
        "mkfs over an existing filesystem needs --force"
    );
}

#[test]
fn daemon_mode_returns_when_ready_and_umount_flushes() {
    let (_dir, image, mnt) = made_image("32M");
    let (img, mp) = (image.to_str().unwrap(), mnt.to_str().unwrap());
    let out = nearfs(&["mount", img, mp]);
    assert_ok(&out);
    let result = std::panic::catch_unwind(|| {
        assert!(
            is_mounted(&mnt),
            "mount returned before the filesystem was ready"
        );
        fs::write(mnt.join("f"), b"not fsynced").unwrap();
    });
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    result.unwrap();
    // fsck waits for the daemon's final commit (it holds the image lock until then).
    let out = nearfs(&["fsck", img]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 inodes"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn mount_helper_works_for_mount_t_and_fstab() {
    let (dir, image, mnt) = made_image("32M");
    let helper = Path::new("/sbin/mount.fuse.nearfs");
    assert!(
        helper.exists(),
        "{} is missing: run scripts/setup.sh",
        helper.display()
    );
    let out = Command::new("mount")
        .args(["-t", "fuse.nearfs", "-o", "allow_other,commit=1"])
        .arg(&image)
        .arg(&mnt)
        .output()
        .unwrap();
    assert_ok(&out);
    let wrote = fs::write(mnt.join("f"), b"via mount -t");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    wrote.unwrap();
    let out = nearfs(&["fsck", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));

    // An fstab line (a private fstab, through mount -T).
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} fuse.nearfs defaults,nofail,ro 0 0\n",
            image.display(),
            mnt.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .unwrap();
    assert_ok(&out);
    let read = fs::read(mnt.join("f"));
    let ro = fs::write(mnt.join("g"), b"x");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert_eq!(read.unwrap(), b"via mount -t");
    assert_eq!(errno_of(&ro.unwrap_err()), libc::EROFS);
}

#[test]
fn concurrent_processes_read_and_write_their_own_files() {
    let t = TestFs::new("256M", "");
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let path = t.path(&format!("t{i}"));
            std::thread::spawn(move || {
                let data = pattern(i, 16 << 20);
                let mut f = File::create(&path).unwrap();
                for chunk in data.chunks(1 << 20) {
                    f.write_all(chunk).unwrap();
                }
                f.sync_all().unwrap();
                assert_eq!(fs::read(&path).unwrap(), data);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..4 {
        assert!(
            extents_of(&t.path(&format!("t{i}"))).len() <= 2,
            "file t{i} fragmented"
        );
    }
}

/// A loop device, detached on drop.
struct Loop(String);

impl Loop {
    fn new(backing: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    /// A daemon closes its device a moment after its unmount returns, and a busy loop
    /// device refuses to detach: try for a while, or the device stays attached.
    fn drop(&mut self) {
        for _ in 0..100 {
            let detached = Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
            if detached.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[test]
fn a_real_block_device_works_with_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    File::create(&backing).unwrap().set_len(64 << 20).unwrap();
    let dev = Loop::new(&backing);
    let out = nearfs(&["mkfs", &dev.0]);
    assert_ok(&out);
    let mnt = dir.path().join("m");
    fs::create_dir(&mnt).unwrap();
    let data = pattern(11, (5 << 20) + 4321);
    let out = nearfs(&["mount", &dev.0, mnt.to_str().unwrap(), "-o", "direct"]);
    assert_ok(&out);
    let result = std::panic::catch_unwind(|| {
        fs::write(mnt.join("f"), &data).unwrap();
        File::open(mnt.join("f")).unwrap().sync_all().unwrap();
    });
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    result.unwrap();
    let out = nearfs(&["fsck", &dev.0]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        nearfs(&["mount", &dev.0, mnt.to_str().unwrap(), "-o", "direct,ro"])
            .status
            .success()
    );
    let back = fs::read(mnt.join("f"));
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert_eq!(back.unwrap(), data);
}

#[test]
fn prog_verify_explains_rejections_and_disasm_assembles_back() {
    let dir = tempfile::tempdir().unwrap();
    let good = compile_bpf(&progs_dir().join("btree.c"), dir.path());
    let out = nearfs(&["prog", "verify", good.to_str().unwrap()]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("btree_lookup: accepted"), "{text}");
    assert!(text.contains("instructions per invocation"), "{text}");

    let bad_src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../appcode/tests/hostile/c_off_by_one.c");
    let bad = compile_bpf(&bad_src, dir.path());
    let out = nearfs(&["prog", "verify", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rejected"), "{text}");
    assert!(text.contains("data window"), "{text}");
    assert!(
        text.contains("c_off_by_one.c:11: sum += data[i];"),
        "{text}"
    );

    let out = nearfs(&["prog", "disasm", good.to_str().unwrap()]);
    assert_ok(&out);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("# ") && listing.contains("btree.c:"),
        "{listing}"
    );
    let insns = appcode::asm::assemble(&listing).expect("disassembly assembles");
    let loaded = appcode::elf::load(&fs::read(&good).unwrap()).unwrap();
    assert_eq!(insns.len(), loaded.programs[0].insns.len());

    let out = nearfs(&["prog", "verify", "/nonexistent.o"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.o"));
}

// ---- Offload: appcode run over a file's own extents through the ioctl. ----

use nearfs_client::layouts::{self, btree, kv, records};
use nearfs_client::{ProgId, Run};
use std::os::unix::fs::FileExt;

/// Compiles `bpf-progs/NAME.c` into the test's directory.
fn example(t: &TestFs, name: &str) -> std::path::PathBuf {
    compile_bpf(&progs_dir().join(format!("{name}.c")), t.dir.path())
}

fn load_example(t: &TestFs, name: &str) -> ProgId {
    let root = File::open(&t.mnt).unwrap();
    let object = fs::read(example(t, name)).unwrap();
    nearfs_client::load(&root, &object, None).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn offload_runs_appcode_over_a_files_own_extents() {
    let t = TestFs::new("256M", "");
    // A B+-tree of depth 3 (fill 40), a file of records, and text with many matches.
    let pairs: Vec<(u64, u64)> = (0..30_000u64).map(|i| (i * 7 + 3, i * i)).collect();
    let (tree, depth) = btree::build(&pairs, 40);
    assert_eq!(depth, 3);
    fs::write(t.path("tree.db"), &tree).unwrap();
    let recs: Vec<(u64, u64)> = (0..100_000u64)
        .map(|i| (i, (i * 2_654_435_761) % 1_000_000))
        .collect();
    let rec_bytes = records::encode(&recs);
    fs::write(t.path("records.bin"), &rec_bytes).unwrap();
    let text: Vec<u8> = (0..3000)
        .flat_map(|i| format!("line {i}: needle here\n").into_bytes())
        .collect();
    fs::write(t.path("text.txt"), &text).unwrap();

    let lookup = load_example(&t, "btree");
    let filter = load_example(&t, "filter");
    let substr = load_example(&t, "substr");

    let f = File::open(t.path("tree.db")).unwrap();
    for &(k, v) in pairs.iter().step_by(211) {
        let out = nearfs_client::run(&f, &Run::new(lookup).arg(&k.to_le_bytes())).unwrap();
        let by_reads = btree::lookup(|buf, at| f.read_exact_at(buf, at), k).unwrap();
        assert_eq!((out.result, by_reads), (v, Some(v)));
        assert_eq!(out.costs.hops, depth as u64 - 1);
        assert_eq!(out.costs.device_bytes, (depth * btree::NODE) as u64);
    }
    let absent = nearfs_client::run(&f, &Run::new(lookup).arg(&5u64.to_le_bytes())).unwrap();
    assert_eq!(absent.result as i64, -1);

    let f = File::open(t.path("records.bin")).unwrap();
    let (lo, hi) = (200_000, 300_000);
    let out = nearfs_client::run(&f, &Run::new(filter).arg(&records::arg(lo, hi))).unwrap();
    let want = records::aggregate(&rec_bytes, lo, hi);
    assert_eq!(out.result, want[0]);
    let got = layouts::words(&out.output);
    assert_eq!(got, want);
    // Half of the file, by range.
    let half = rec_bytes.len() as u64 / 2;
    let out = nearfs_client::run(
        &f,
        &Run::new(filter).arg(&records::arg(lo, hi)).range(0, half),
    )
    .unwrap();
    assert_eq!(
        out.result,
        records::aggregate(&rec_bytes[..half as usize], lo, hi)[0]
    );

    // 3000 matches are 24000 bytes of output: three ioctls' worth, fetched with MORE.
    let f = File::open(t.path("text.txt")).unwrap();
    let out = nearfs_client::run(&f, &Run::new(substr).arg(b"needle")).unwrap();
    let want: Vec<u8> = (0..text.len() - 6)
        .filter(|&i| &text[i..i + 6] == b"needle")
        .flat_map(|i| (i as u64).to_le_bytes())
        .collect();
    assert_eq!(out.result, 3000);
    assert_eq!(out.output.len(), want.len());
    assert_eq!(out.output, want);

    // Inspection, listing, unloading.
    let stats =
        String::from_utf8(getxattr(&t.path("tree.db"), "user.nearfs.stats").unwrap()).unwrap();
    // Every lookup, and the one of an absent key, walks down to a leaf.
    let lookups = pairs.iter().step_by(211).count() as u64 + 1;
    let want = format!(
        "runs={lookups} failures=0 hops={} ",
        lookups * (depth as u64 - 1)
    );
    assert!(stats.starts_with(&want), "{stats}");
    // The daemon's own time on those runs is counted too.
    let run_ns: u64 = stats
        .split_whitespace()
        .find_map(|w| w.strip_prefix("run_ns="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no run_ns in {stats}"));
    assert!(run_ns > 0, "{stats}");
    let progs = String::from_utf8(getxattr(&t.mnt, "user.nearfs.programs").unwrap()).unwrap();
    for name in ["btree_lookup", "filter", "substr"] {
        assert!(progs.contains(&format!("name={name} ")), "{progs}");
    }
    let root = File::open(&t.mnt).unwrap();
    assert_eq!(nearfs_client::list(&root).unwrap().len(), 3);
    nearfs_client::unload(&root, lookup).unwrap();
    let gone = nearfs_client::run(&f, &Run::new(lookup)).unwrap_err();
    assert_eq!(client_errno(&gone), Some(libc::ENOENT));
    assert_eq!(nearfs_client::list(&root).unwrap().len(), 2);
}

#[test]
fn offload_access_follows_handles_credentials_and_owner_policy() {
    let t = TestFs::new("64M", "allow_other");
    let tool = nearfs_for_everyone(t.dir.path());
    let tool = tool.to_str().unwrap();
    let key = [7u8; kv::KEY];
    let rec = kv::record(&key, 0);
    for (name, mode) in [("shared.kv", 0o644), ("private.kv", 0o600)] {
        fs::write(t.path(name), &rec).unwrap();
        std::os::unix::fs::chown(t.path(name), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(t.path(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    let incr = load_example(&t, "kv_increment").0;
    let arg = format!("--arg u64:0 --arg hex:{}", "07".repeat(kv::KEY));
    let shared = t.path("shared.kv");
    let shared = shared.to_str().unwrap();
    let private = t.path("private.kv");
    let private = private.to_str().unwrap();
    let run = |uid: u32, file: &str, extra: &str| {
        sh_as(
            uid,
            uid,
            &[],
            &format!("{tool} run {file} {incr} {arg} {extra} --out raw"),
        )
    };
    // Another user may run a reading program on a file it can read...
    let out = run(2000, shared, "");
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("result={}", -libc::EPERM as u64)),
        "kv_increment without write intent gets -EPERM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...but not one on a file it cannot open, nor a writing one on a file it cannot write.
    assert!(!run(2000, private, "").status.success());
    let w = run(2000, shared, "--write");
    assert!(!w.status.success());
    assert!(String::from_utf8_lossy(&w.stderr).contains("Permission denied"));
    // The owner may write, and the increment lands.
    assert_ok(&run(1000, shared, "--write"));
    assert_eq!(kv::counter(&fs::read(t.path("shared.kv")).unwrap()), 1);
    // A read-only handle never runs appcode that writes, whoever holds it.
    let ro = File::open(t.path("shared.kv")).unwrap();
    let e = nearfs_client::run(
        &ro,
        &Run::new(ProgId(incr)).arg(&kv::arg(0, &key)).write(true),
    )
    .unwrap_err();
    assert_eq!(client_errno(&e), Some(libc::EBADF));
    // The owner's policy: `ro` stops writing runs, `off` stops all; only the owner sets it.
    let set = |uid: u32, v: &str| {
        sh_as(
            uid,
            uid,
            &[],
            &format!("setfattr -n user.nearfs.offload -v {v} {shared}"),
        )
    };
    assert!(!set(2000, "off").status.success());
    assert_ok(&set(1000, "ro"));
    assert!(!run(1000, shared, "--write").status.success());
    assert_ok(&run(2000, shared, ""));
    assert_ok(&set(1000, "off"));
    let off = run(2000, shared, "");
    assert!(
        String::from_utf8_lossy(&off.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    assert_eq!(kv::counter(&fs::read(t.path("shared.kv")).unwrap()), 1);
    // The policy is one of its words: anything else would mean different things to the
    // daemon and to whoever reads it.
    assert!(!set(1000, "OFF").status.success());
    assert_ok(&set(1000, "rw"));
    assert_ok(&run(2000, shared, ""));
    // The views of a file are read as its stored attributes are: with read permission.
    let stats = |uid: u32, file: &str| {
        sh_as(
            uid,
            uid,
            &[],
            &format!("getfattr --only-values -n user.nearfs.stats {file}"),
        )
    };
    assert_ok(&stats(1000, private));
    let denied = stats(2000, private);
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(String::from_utf8_lossy(&stats(2000, shared).stdout).contains("runs="));
    // Programs belong to whoever loaded them.
    let out = sh_as(
        2000,
        2000,
        &[],
        &format!("{tool} prog unload {} {incr}", t.mnt.display()),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
}

#[test]
fn offloaded_increments_are_atomic_and_visible_to_reads() {
    // Over io_uring too: there, replies that wait for a page drop hold queue entries
    // while the write() the drop waits for needs one (docs/fuse.md).
    increments_are_atomic_and_visible_to_reads("");
    if kernel_offers_uring() {
        increments_are_atomic_and_visible_to_reads("uring");
    }
}

fn increments_are_atomic_and_visible_to_reads(options: &str) {
    let t = TestFs::new("64M", options);
    let key = [9u8; kv::KEY];
    let mut file: Vec<u8> = (0..4u8)
        .flat_map(|k| kv::record(&[k; kv::KEY], 0))
        .collect();
    file.extend(kv::record(&key, 0));
    fs::write(t.path("counters.kv"), &file).unwrap();
    let before = fs::metadata(t.path("counters.kv")).unwrap().mtime_nsec();
    let object = example(&t, "kv_increment");
    let id = load_example(&t, "kv_increment").0;
    let _ = object;
    // Cache the file's pages in the kernel, so that visibility needs invalidation.
    assert_eq!(
        kv::counter(&fs::read(t.path("counters.kv")).unwrap()[4 * kv::SIZE..]),
        0
    );
    let arg = format!("--arg u64:4 --arg hex:{}", "09".repeat(kv::KEY));
    let path = t.path("counters.kv");
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(nearfs_bin())
                .args([
                    "run",
                    path.to_str().unwrap(),
                    &id.to_string(),
                    "--write",
                    "--repeat",
                    "10000",
                    "--out",
                    "raw",
                ])
                .args(arg.split(' '))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Meanwhile write() rewrites another record of the same file.
    let w = OpenOptions::new()
        .write(true)
        .open(t.path("counters.kv"))
        .unwrap();
    for i in 0..2000u64 {
        w.write_all_at(&kv::record(&[1; kv::KEY], i), kv::SIZE as u64)
            .unwrap();
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_ok(&out);
    }
    let now = fs::read(t.path("counters.kv")).unwrap();
    assert_eq!(kv::counter(&now[4 * kv::SIZE..]), 80_000);
    assert_eq!(kv::counter(&now[kv::SIZE..2 * kv::SIZE]), 1999);
    assert_ne!(
        fs::metadata(t.path("counters.kv")).unwrap().mtime_nsec(),
        before
    );
}

#[test]
fn writing_runs_drop_pages_only_when_the_kernel_may_hold_them() {
    let t = TestFs::new("64M", "");
    let key = [7u8; kv::KEY];
    // Two pages, with a counter of `key` in each.
    let slots = [0u64, 64];
    let records: Vec<u8> = (0..128u64)
        .flat_map(|s| {
            kv::record(
                if slots.contains(&s) {
                    &key
                } else {
                    &[0; kv::KEY]
                },
                0,
            )
        })
        .collect();
    fs::write(t.path("two.kv"), &records).unwrap();
    let id = ProgId(load_example(&t, "kv_increment").0);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path("two.kv"))
        .unwrap();
    let increment = |slot: u64, want: u64| {
        let arg = kv::arg(slot, &key);
        let out = nearfs_client::run(&f, &Run::new(id).arg(&arg).write(true)).unwrap();
        assert_eq!(out.result, want);
    };
    let counters = |bytes: &[u8]| slots.map(|s| kv::counter(&bytes[s as usize * kv::SIZE..]));
    let read = || counters(&fs::read(t.path("two.kv")).unwrap());
    let dropped = || -> u64 {
        let stats =
            String::from_utf8(getxattr(&t.path("two.kv"), "user.nearfs.stats").unwrap()).unwrap();
        stats
            .split_whitespace()
            .find_map(|w| w.strip_prefix("invalidations="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no invalidations in {stats}"))
    };
    // The write that created the file went through the page cache.
    increment(0, 1);
    assert_eq!(dropped(), 1);
    // Nothing was read or written since: the kernel holds no pages to drop. It may hold
    // the file's attributes, which the run changed: `stat` sees the new mtime at once.
    let mtime = || {
        let m = fs::metadata(t.path("two.kv")).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    let before = mtime();
    increment(0, 2);
    assert_ne!(mtime(), before);
    increment(64, 1);
    assert_eq!(dropped(), 1);
    // A read fills the page cache; the next run drops all of it, not only the page it
    // wrote, so a later run of the other page needs no drop and is still seen.
    assert_eq!(read(), [2, 1]);
    increment(0, 3);
    assert_eq!(dropped(), 2);
    increment(64, 2);
    assert_eq!(dropped(), 2);
    assert_eq!(read(), [3, 2]);
    // Pages mapped into memory are read through the same path, and dropped the same way.
    increment(0, 4);
    assert_eq!(dropped(), 3);
    let len = records.len();
    // SAFETY: a fresh shared read-only mapping of an open file, unmapped below; the bytes
    // are only read through `view`, which does not outlive it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is `len` bytes long and stays mapped while `view` is used.
    let view = || counters(unsafe { std::slice::from_raw_parts(map as *const u8, len) });
    assert_eq!(view(), [4, 2]);
    increment(64, 3);
    assert_eq!(view(), [4, 3]);
    assert_eq!(dropped(), 4);
    // SAFETY: `map` came from the mmap above and is no longer used.
    assert_eq!(unsafe { libc::munmap(map, len) }, 0);
}

#[test]
fn a_failing_run_writes_nothing_and_bad_requests_get_their_own_errno() {
    let t = TestFs::new("64M", "");
    let key = [3u8; kv::KEY];
    fs::write(t.path("one.kv"), kv::record(&key, 41)).unwrap();
    // Writes the counter, then hops outside its range: the run fails, the write is dropped.
    let src = t.dir.path().join("write_then_fail.c");
    fs::write(
        &src,
        r#"#include "nearfs.h"
NEARFS_PROG("write_then_fail") long write_then_fail(struct nearfs_ctx *ctx)
{
    __u64 v = 1000;
    nearfs_write(56, &v, 8);
    return nearfs_next(ctx, ctx->range_end + 4096);
}
"#,
    )
    .unwrap();
    let obj = fs::read(compile_bpf(&src, t.dir.path())).unwrap();
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path("one.kv"))
        .unwrap();
    let bad = nearfs_client::load(&rw, &obj, None).unwrap();
    match nearfs_client::run(&rw, &Run::new(bad).write(true)) {
        Err(nearfs_client::Error::RunFailed { kind, .. }) => {
            assert_eq!(kind, nearfs_client::abi::run_error::OUT_OF_RANGE)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kv::counter(&fs::read(t.path("one.kv")).unwrap()), 41);

    // A program the verifier rejects comes back with its log.
    let hostile = fs::read(compile_bpf(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../appcode/tests/hostile/c_off_by_one.c"),
        t.dir.path(),
    ))
    .unwrap();
    match nearfs_client::load(&rw, &hostile, None) {
        Err(nearfs_client::Error::Rejected { log }) => {
            assert!(log.contains("data window"), "{log}")
        }
        other => panic!("{other:?}"),
    }
    let errno_of_run = |f: &File, r: &Run<'_>| client_errno(&nearfs_client::run(f, r).unwrap_err());
    let incr = load_example(&t, "kv_increment");
    assert_eq!(
        errno_of_run(&rw, &Run::new(ProgId(999_999))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno_of_run(&rw, &Run::new(incr).range(u64::MAX - 10, 100)),
        Some(libc::EOVERFLOW)
    );
    let dir = File::open(&t.mnt).unwrap();
    assert_eq!(errno_of_run(&dir, &Run::new(incr)), Some(libc::EISDIR));
    // Wrong ABI version, wrong size, unknown command: raw ioctls.
    let raw = |cmd: u32, buf: &mut [u8]| {
        // SAFETY: `buf` holds the command's size in bytes.
        let r = unsafe { libc::ioctl(rw.as_raw_fd(), cmd as libc::c_ulong, buf.as_mut_ptr()) };
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error()
        } else {
            None
        }
    };
    let mut req = nearfs_client::abi::request(nearfs_client::abi::cmd::RUN_SIZE, 0);
    req[0..4].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(
        raw(nearfs_client::abi::cmd::RUN, &mut req),
        Some(libc::EPROTO)
    );
    let mut small = vec![0u8; 64];
    assert_eq!(
        raw(nearfs_client::abi::iowr(6, 64), &mut small),
        Some(libc::ENOTTY)
    );
    // Fields only the daemon fills come back as it set them, not as the caller left them
    // (a reused struct's `more` would fetch an earlier run's output).
    {
        use nearfs_client::abi::{Fields, FieldsMut, cmd, off::run};
        let mut req = nearfs_client::abi::request(cmd::RUN_SIZE, 0);
        req.put_u64(run::PROG_ID, incr.0);
        req.put_u32(run::RUN_ERROR, 7);
        req.put_u64(run::MORE, 0xdead_beef);
        req.put_u64(run::OUTPUT_BYTES, 1 << 40);
        assert_eq!(raw(cmd::RUN, &mut req), None);
        assert_eq!(req.i32_at(run::STATUS), 0);
        assert_eq!(req.u32_at(run::RUN_ERROR), 0);
        assert_eq!(req.u64_at(run::MORE), 0);
        assert_eq!(req.u64_at(run::OUTPUT_BYTES), 0);
    }
    assert_eq!(
        nearfs_client::version(&rw).unwrap(),
        nearfs_client::abi::ABI_VERSION
    );
    // Clients of ABI version 1 keep working: they asked VERSION with zeros and expect 1,
    // and send version-1 structs; the small RUN is version 2's.
    {
        use nearfs_client::abi::{Fields, FieldsMut, VERSIONS, cmd, off};
        // Version 1's header called `version` an output: whatever such a client left in
        // it, it gets version 1's answer.
        for left in [0, 7, u32::MAX] {
            let mut v = vec![0u8; cmd::VERSION_SIZE];
            v.put_u32(off::VERSION, left);
            assert_eq!(raw(cmd::VERSION, &mut v), None);
            assert_eq!(
                (v.u32_at(off::VERSION), v.u32_at(off::FLAGS)),
                (1, VERSIONS)
            );
        }
        let mut req = nearfs_client::abi::request(cmd::RUN_SIZE, nearfs_client::abi::RUN_WRITE);
        req.put_u32(off::VERSION, 1);
        req.put_u64(off::run::PROG_ID, incr.0);
        req.put_u64(off::run::RANGE_LEN, nearfs_client::abi::RANGE_TO_END);
        let arg = kv::arg(0, &key);
        req.put_u32(off::run::ARG_LEN, arg.len() as u32);
        req[off::run::ARG..off::run::ARG + arg.len()].copy_from_slice(&arg);
        assert_eq!(raw(cmd::RUN, &mut req), None);
        assert_eq!(req.i32_at(off::run::STATUS), 0);
        let after = req.u64_at(off::run::RESULT);
        assert_eq!(after, 42);
        let mut small =
            nearfs_client::abi::request(cmd::RUN_SMALL_SIZE, nearfs_client::abi::RUN_WRITE);
        small.put_u64(off::run::PROG_ID, incr.0);
        small.put_u64(off::run::RANGE_LEN, nearfs_client::abi::RANGE_TO_END);
        small.put_u32(off::run::ARG_LEN, arg.len() as u32);
        small[off::run::ARG..off::run::ARG + arg.len()].copy_from_slice(&arg);
        small.put_u32(off::VERSION, 1);
        assert_eq!(raw(cmd::RUN_SMALL, &mut small), Some(libc::EPROTO));
        small.put_u32(off::VERSION, 2);
        assert_eq!(raw(cmd::RUN_SMALL, &mut small), None);
        assert_eq!(small.u64_at(off::run::RESULT), after + 1);
        small.put_u32(off::run::ARG_LEN, 65);
        assert_eq!(raw(cmd::RUN_SMALL, &mut small), Some(libc::E2BIG));
    }
    // A file deleted while open still runs, as it still reads.
    fs::remove_file(t.path("one.kv")).unwrap();
    let out = nearfs_client::run(&rw, &Run::new(incr).arg(&kv::arg(0, &key)).write(true)).unwrap();
    assert_eq!(out.result, 44);
    drop(rw);
    // Nothing else changed: the filesystem is clean.
    drop(dir);
}

#[test]
fn the_c_example_application_looks_up_keys_with_one_ioctl() {
    let t = TestFs::new("64M", "");
    let pairs: Vec<(u64, u64)> = (0..5_000u64).map(|i| (i * 13, i + 1_000)).collect();
    let (tree, depth) = btree::build(&pairs, 64);
    fs::write(t.path("tree.db"), &tree).unwrap();
    let app = t.dir.path().join("lookup");
    assert_ok(
        &Command::new("clang")
            .args(["-O2", "-Wall", "-Werror", "-I"])
            .arg(progs_dir().join("include"))
            .arg(progs_dir().join("app/lookup.c"))
            .arg("-o")
            .arg(&app)
            .output()
            .unwrap(),
    );
    let object = example(&t, "btree");
    for (key, want) in [(13 * 4321, "5321\n"), (14, "absent\n")] {
        let out = Command::new(&app)
            .arg(t.path("tree.db"))
            .arg(&object)
            .arg(key.to_string())
            .output()
            .unwrap();
        assert_ok(&out);
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        let costs = format!("hops={} device_bytes={}", depth - 1, depth * btree::NODE);
        assert!(String::from_utf8_lossy(&out.stderr).contains(&costs));
    }
    // It unloaded its program.
    assert!(
        nearfs_client::list(&File::open(&t.mnt).unwrap())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_demo_runs_lookups_and_a_filter_both_ways() {
    let t = TestFs::new("256M", "");
    let out = nearfs(&["demo", t.mnt.to_str().unwrap()]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lookups, same answers every way"), "{text}");
    assert!(text.contains("same answer both ways"), "{text}");
    let stats =
        String::from_utf8(getxattr(&t.path("demo-tree.db"), "user.nearfs.stats").unwrap()).unwrap();
    assert!(stats.starts_with("runs=2000 failures=0"), "{stats}");
    // Not a nearfs directory: a clear error.
    let out = nearfs(&["demo", t.dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on a nearfs mount"));
}

#[test]
fn range_search_and_pruning_examples_agree_with_reads_through_the_mount() {
    use nearfs_client::layouts::minmax;
    let t = TestFs::new("128M", "");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pairs: Vec<(u64, u64)> = (0..40_000).map(|_| (next() % (1 << 32), next())).collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    fs::write(t.path("tree.db"), btree::build(&pairs, 120).0).unwrap();
    let sorted: Vec<u64> = pairs.iter().map(|p| p.0).collect();
    fs::write(
        t.path("sorted.u64"),
        sorted
            .iter()
            .flat_map(|k| k.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let blocks: Vec<Vec<u64>> = (0..700u64)
        .map(|j| (0..400).map(|_| j * 10_000 + next() % 10_000).collect())
        .collect();
    fs::write(t.path("series.mm"), minmax::build(&blocks)).unwrap();

    let (range, search, prune) = (
        load_example(&t, "btree_range"),
        load_example(&t, "bsearch"),
        load_example(&t, "minmax"),
    );
    let tree = File::open(t.path("tree.db")).unwrap();
    for _ in 0..20 {
        let lo = next() % (1 << 32);
        let hi = lo + next() % (1 << 26);
        let want = btree::range(|b, at| tree.read_exact_at(b, at), lo, hi).unwrap();
        let out = nearfs_client::run(&tree, &Run::new(range).arg(&records::arg(lo, hi))).unwrap();
        let got = layouts::pairs(&out.output);
        assert_eq!(got, want);
    }
    let arr = File::open(t.path("sorted.u64")).unwrap();
    for i in (0..sorted.len()).step_by(997) {
        let out =
            nearfs_client::run(&arr, &Run::new(search).arg(&sorted[i].to_le_bytes())).unwrap();
        assert_eq!(out.result, i as u64);
    }
    let absent =
        nearfs_client::run(&arr, &Run::new(search).arg(&(sorted[5] + 1).to_le_bytes())).unwrap();
    assert_eq!(absent.result as i64, -1);
    let series = File::open(t.path("series.mm")).unwrap();
    let (lo, hi) = (3_215_000, 3_240_000);
    let want = minmax::aggregate(|b, at| series.read_exact_at(b, at), lo, hi).unwrap();
    let out = nearfs_client::run(&series, &Run::new(prune).arg(&records::arg(lo, hi))).unwrap();
    let got = layouts::words(&out.output);
    assert_eq!(got, want);
    assert!(
        out.costs.device_bytes < 20 * 4096,
        "read {} bytes",
        out.costs.device_bytes
    );
}

#[test]
fn the_mount_can_turn_offload_off_or_read_only() {
    let mut t = TestFs::new("64M", "offload=ro");
    let key = [5u8; kv::KEY];
    fs::write(t.path("c.kv"), kv::record(&key, 0)).unwrap();
    let incr = load_example(&t, "kv_increment");
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path("c.kv"))
        .unwrap();
    let e =
        nearfs_client::run(&rw, &Run::new(incr).arg(&kv::arg(0, &key)).write(true)).unwrap_err();
    assert_eq!(client_errno(&e), Some(libc::EROFS));
    let read_run = nearfs_client::run(&rw, &Run::new(incr).arg(&kv::arg(0, &key))).unwrap();
    assert_eq!(
        read_run.result as i64,
        -(libc::EPERM as i64),
        "without write intent"
    );
    drop(rw);
    t.unmount();
    t.mount("offload=off");
    let f = File::open(t.path("c.kv")).unwrap();
    let object = fs::read(example(&t, "kv_increment")).unwrap();
    let e = nearfs_client::load(&f, &object, None).unwrap_err();
    assert_eq!(client_errno(&e), Some(libc::EOPNOTSUPP));
    // The version query still answers, so a client can say what is going on.
    assert_eq!(
        nearfs_client::version(&f).unwrap(),
        nearfs_client::abi::ABI_VERSION
    );
}

#[test]
fn per_user_run_limits_queue_fairly_and_unloading_a_running_program_is_safe() {
    let t = TestFs::new("64M", "offload_runs=1");
    fs::write(t.path("block"), vec![1u8; 4096]).unwrap();
    // Sums 256 bytes, then hops to the start of its range, until the hop limit (2^20 hops,
    // a few seconds) ends the run.
    let src = t.dir.path().join("spin.c");
    fs::write(
        &src,
        r#"#include "nearfs.h"
NEARFS_PROG("spin") long spin(struct nearfs_ctx *ctx)
{
    const __u8 *d = (const __u8 *)(long)ctx->data;
    __u64 sum = 0;
    for (int i = 0; i < 256; i++)
        sum += d[i];
    if (sum == 0)
        return 0;
    return nearfs_next(ctx, ctx->range_start);
}
"#,
    )
    .unwrap();
    let object = fs::read(compile_bpf(&src, t.dir.path())).unwrap();
    let f = File::open(t.path("block")).unwrap();
    let spin = nearfs_client::load(&f, &object, None).unwrap();
    let other = load_example(&t, "bytecount");
    // Each run's thread returns its result and the file's stats right after it: the
    // daemon counts a run in them before it lets the user's next run start.
    let started = |prog: ProgId, arg: &'static [u8]| {
        let path = t.path("block");
        std::thread::spawn(move || {
            let f = File::open(&path).unwrap();
            let r = nearfs_client::run(&f, &Run::new(prog).arg(arg));
            let stats = String::from_utf8(getxattr(&path, "user.nearfs.stats").unwrap());
            (r, stats.unwrap())
        })
    };
    let long = started(spin, &[]);
    // While it runs, this user's next run waits for it: the user may have one run going
    // (offload_runs=1). (Other users' runs do not wait for this user's: the offload
    // workers take users in turn, see `fs/src/workers.rs`.)
    std::thread::sleep(std::time::Duration::from_millis(200));
    let queued = started(other, &[1]);
    // The program can be unloaded mid-run; the run in progress is unaffected.
    nearfs_client::unload(&f, spin).unwrap();
    match long.join().unwrap().0 {
        Err(nearfs_client::Error::RunFailed { kind, .. }) => {
            assert_eq!(kind, nearfs_client::abi::run_error::HOPS)
        }
        other => panic!("{other:?}"),
    }
    let (r, stats) = queued.join().unwrap();
    assert_eq!(r.unwrap().result, 4096);
    assert!(
        stats.starts_with("runs=2 failures=1 "),
        "the queued run ran after the long one had failed: {stats}"
    );
    assert_eq!(
        client_errno(&nearfs_client::run(&f, &Run::new(spin)).unwrap_err()),
        Some(libc::ENOENT)
    );
    // Chunks out of order are refused.
    let mut b = nearfs_client::abi::request(nearfs_client::abi::cmd::LOAD_SIZE, 0);
    b[16..24].copy_from_slice(&4096u64.to_le_bytes());
    // SAFETY: `b` holds the command's size in bytes.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            nearfs_client::abi::cmd::LOAD as libc::c_ulong,
            b.as_mut_ptr(),
        )
    };
    assert!(r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL));
}

/// The hostile corpus's C programs of each class that brought the checked engine, loaded
/// and run through a mount by an unprivileged user: each is refused or ends as its header
/// says, and the daemon goes on serving.
#[test]
fn hostile_programs_from_an_unprivileged_user_leave_the_daemon_serving() {
    let t = TestFs::new("64M", "allow_other");
    let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i % 253) as u8 + 1).collect();
    fs::write(t.path("data"), &data).unwrap();
    fs::set_permissions(t.path("data"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&t.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let tool = nearfs_for_everyone(t.dir.path());
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../appcode/tests/hostile");
    let file = t.path("data");
    let as_user = |object: &Path, extra: &str| {
        sh_as(
            4242,
            4242,
            &[],
            &format!(
                "{} run {} {} {extra} --out hex",
                tool.display(),
                file.display(),
                object.display()
            ),
        )
    };
    for (name, want) in [
        ("c_pointer_unbounded", "an offset must stay within"),
        ("c_many_globals", "global sections"),
        ("c_failed_read_zeroes", "result=18446744073709551582"),
        ("c_long_program", "result=9913224973551562204"),
        ("c_memmem_flood", "result=18446744073709511616"),
        ("c_off_by_one", "data window"),
    ] {
        let object = compile_bpf(&corpus.join(format!("{name}.c")), t.dir.path());
        let out = as_user(&object, "");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains(want), "{name}: {said}");
        if name == "c_failed_read_zeroes" {
            // 480 bytes of output, all zero: nothing of the stack's past leaks.
            let bytes: Vec<u8> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .flat_map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .map(|b| u8::from_str_radix(&b, 16).unwrap())
                .collect();
            assert_eq!(bytes, vec![0u8; 480], "{said}");
        }
    }
    // The daemon serves the next request: another program, and plain file I/O.
    let bytecount = example(&t, "bytecount");
    let out = as_user(&bytecount, "--arg hex:01");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("result=260"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(t.path("data")).unwrap(), data);
    fs::write(t.path("after"), b"still serving").unwrap();
    assert_eq!(fs::read(t.path("after")).unwrap(), b"still serving");
}

/// `offload_programs=` and `offload_bytes=` bound what one user holds in the daemon, and
/// `user.nearfs.fs` shows them with what is held.
#[test]
fn per_user_program_and_byte_limits_are_enforced_and_shown() {
    let t = TestFs::new("64M", "offload_programs=2,offload_bytes=1M");
    let facts = String::from_utf8(getxattr(&t.mnt, "user.nearfs.fs").unwrap()).unwrap();
    for want in [
        "offload_engine=checked",
        "offload_programs=2",
        "offload_bytes=1048576",
        "programs_loaded=0",
        "offload_bytes_held=0",
    ] {
        assert!(facts.contains(want), "{want}: {facts}");
    }
    let root = File::open(&t.mnt).unwrap();
    let object = fs::read(example(&t, "bytecount")).unwrap();
    let a = nearfs_client::load(&root, &object, None).unwrap();
    let second = nearfs_client::load(&root, &object, None).unwrap();
    let third = nearfs_client::load(&root, &object, None).unwrap_err();
    assert_eq!(client_errno(&third), Some(libc::EDQUOT), "{third}");
    let facts = String::from_utf8(getxattr(&t.mnt, "user.nearfs.fs").unwrap()).unwrap();
    assert!(facts.contains("programs_loaded=2"), "{facts}");
    assert!(!facts.contains("offload_bytes_held=0"), "{facts}");
    nearfs_client::unload(&root, a).unwrap();
    let b = nearfs_client::load(&root, &object, None).unwrap();
    nearfs_client::unload(&root, b).unwrap();
    nearfs_client::unload(&root, second).unwrap();

    // A program whose constants take most of the bytes fits once, not twice.
    let src = t.dir.path().join("big_table.c");
    fs::write(
        &src,
        r#"#include "nearfs.h"
static const volatile __u8 table[700 * 1024] = {1};
NEARFS_PROG("big_table") long big_table(struct nearfs_ctx *ctx)
{
    return table[ctx->hop & 1023];
}
"#,
    )
    .unwrap();
    let big = fs::read(compile_bpf(&src, t.dir.path())).unwrap();
    assert!(big.len() > 700 * 1024);
    let first = nearfs_client::load(&root, &big, None).unwrap();
    match nearfs_client::load(&root, &big, None) {
        // The upload itself no longer fits, or the verified program does not.
        Err(e) if client_errno(&e) == Some(libc::EDQUOT) => {}
        Err(nearfs_client::Error::Rejected { log }) => {
            assert!(log.contains("does not fit"), "{log}")
        }
        other => panic!("{other:?}"),
    }
    nearfs_client::unload(&root, first).unwrap();
    let again = nearfs_client::load(&root, &big, None).unwrap();
    nearfs_client::unload(&root, again).unwrap();

    // Output past the first reply is held, charged to the user: a reading run whose output
    // no longer fits what the user may hold fails, and holds nothing.
    let src = t.dir.path().join("emit_12k.c");
    fs::write(
        &src,
        r#"#include "nearfs.h"
NEARFS_PROG("emit_12k") long emit_12k(struct nearfs_ctx *ctx)
{
    void *s = (void *)(long)ctx->scratch;
    nearfs_emit(s, 4096);
    nearfs_emit(s, 4096);
    nearfs_emit(s, 4096);
    return 0;
}
"#,
    )
    .unwrap();
    fs::write(t.path("f"), b"x").unwrap();
    let f = File::open(t.path("f")).unwrap();
    let emit = nearfs_client::load(
        &f,
        &fs::read(compile_bpf(&src, t.dir.path())).unwrap(),
        None,
    )
    .unwrap();
    // And one whose output fits the large reply, not the small one.
    let src_1k = t.dir.path().join("emit_1k.c");
    fs::write(
        &src_1k,
        r#"#include "nearfs.h"
NEARFS_PROG("emit_1k") long emit_1k(struct nearfs_ctx *ctx)
{
    nearfs_emit((void *)(long)ctx->scratch, 1024);
    return 7;
}
"#,
    )
    .unwrap();
    let emit_1k = nearfs_client::load(
        &f,
        &fs::read(compile_bpf(&src_1k, t.dir.path())).unwrap(),
        None,
    )
    .unwrap();
    let held = |f: &File| {
        use nearfs_client::abi::{Fields, FieldsMut, cmd, off::run};
        let mut req = nearfs_client::abi::request(cmd::RUN_SIZE, 0);
        req.put_u64(run::PROG_ID, emit.0);
        // SAFETY: `req` holds the command's size in bytes.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), cmd::RUN as libc::c_ulong, req.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        (
            req.i32_at(run::STATUS),
            req.u32_at(run::RUN_ERROR),
            req.u64_at(run::MORE),
        )
    };
    let mut tokens = 0;
    loop {
        match held(&f) {
            (0, _, more) => {
                assert_ne!(more, 0, "12 KiB do not fit one reply");
                tokens += 1;
            }
            (status, kind, more) => {
                assert_eq!(status, -libc::E2BIG);
                assert_eq!(kind, nearfs_client::abi::run_error::OUTPUT_BYTES);
                assert_eq!(more, 0);
                break;
            }
        }
        assert!(tokens <= 64, "held outputs have no limit");
    }
    // 16 things held at most: the outputs, beside the loaded program.
    assert!((1..=16).contains(&tokens), "{tokens}");
    // With no room to hold anything more, output the large reply holds still comes back:
    // the client runs a reading run again in the large struct when the small one's
    // output found no room.
    let out = nearfs_client::run(&f, &Run::new(emit_1k)).unwrap();
    assert_eq!((out.result, out.output.len()), (7, 1024));
}

/// `nearfs prog run`: a program over an ordinary file, no mount, on either engine.
#[test]
fn prog_run_runs_a_program_over_an_ordinary_file_on_either_engine() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(9, 10_000);
    let file = dir.path().join("data.bin");
    fs::write(&file, &data).unwrap();
    let want = data.iter().filter(|&&b| b == 7).count();
    let object = compile_bpf(&progs_dir().join("bytecount.c"), dir.path());
    for engine in ["checked", "interpreter"] {
        let out = nearfs(&[
            "prog",
            "run",
            object.to_str().unwrap(),
            file.to_str().unwrap(),
            "--arg",
            "hex:07",
            "--engine",
            engine,
        ]);
        assert_ok(&out);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(&format!("result={want} ")),
            "{engine}: {said}"
        );
        assert!(
            said.contains("hops=2 device_bytes=10000"),
            "{engine}: {said}"
        );
    }
    // With --write the program's writes land in the file.
    let key = [5u8; kv::KEY];
    let counters = dir.path().join("counters.kv");
    fs::write(&counters, kv::record(&key, 41)).unwrap();
    let incr = compile_bpf(&progs_dir().join("kv_increment.c"), dir.path());
    let out = nearfs(&[
        "prog",
        "run",
        incr.to_str().unwrap(),
        counters.to_str().unwrap(),
        "--write",
        "--arg",
        "u64:0",
        "--arg",
        &format!("hex:{}", "05".repeat(kv::KEY)),
    ]);
    assert_ok(&out);
    assert_eq!(kv::counter(&fs::read(&counters).unwrap()), 42);
    // A program the verifier refuses says why.
    let bad = compile_bpf(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../appcode/tests/hostile/c_off_by_one.c"),
        dir.path(),
    );
    let out = nearfs(&["prog", "run", bad.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("data window"));
}
