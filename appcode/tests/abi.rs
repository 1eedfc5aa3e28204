//! `bpf-progs/include/nearfs.h` and `appcode::abi` describe the same ABI: a C program
//! compiled against the header prints its layout and constants, and they must match.

mod common;

use std::process::Command;

use appcode::abi::{self, ctx, helper};

const PRINT: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include "nearfs.h"
#define F(field) printf(#field " %zu\n", offsetof(struct nearfs_ctx, field));
#define C(name) printf(#name " %llu\n", (unsigned long long)(name));
int main(void)
{
    F(data) F(data_end) F(scratch) F(arg) F(arg_len) F(offset) F(range_start) F(range_end)
    F(file_size) F(hop) F(next)
    printf("size %zu\n", sizeof(struct nearfs_ctx));
    C(NEARFS_WINDOW_SIZE) C(NEARFS_SCRATCH_SIZE) C(NEARFS_ARG_SIZE) C(NEARFS_STACK_SIZE)
    C(NEARFS_NO_NEXT) C(NEARFS_HELPER_READ) C(NEARFS_HELPER_WRITE) C(NEARFS_HELPER_EMIT)
    C(NEARFS_HELPER_MEMCMP) C(NEARFS_HELPER_MEMMEM) C(NEARFS_ERANGE) C(NEARFS_EPERM)
    C(NEARFS_ENOSPC) C(NEARFS_EIO) C(NEARFS_EINVAL)
    return 0;
}
"#;

#[test]
fn the_c_header_and_the_rust_module_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join("abi.c"), dir.path().join("abi"));
    std::fs::write(&src, PRINT).unwrap();
    let out = Command::new("clang")
        .arg("-I")
        .arg(common::progs_dir().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("clang");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let want: Vec<(&str, u64)> = vec![
        ("data", ctx::DATA as u64),
        ("data_end", ctx::DATA_END as u64),
        ("scratch", ctx::SCRATCH as u64),
        ("arg", ctx::ARG as u64),
        ("arg_len", ctx::ARG_LEN as u64),
        ("offset", ctx::OFFSET as u64),
        ("range_start", ctx::RANGE_START as u64),
        ("range_end", ctx::RANGE_END as u64),
        ("file_size", ctx::FILE_SIZE as u64),
        ("hop", ctx::HOP as u64),
        ("next", ctx::NEXT as u64),
        ("size", ctx::SIZE as u64),
        ("NEARFS_WINDOW_SIZE", abi::WINDOW_SIZE as u64),
        ("NEARFS_SCRATCH_SIZE", abi::SCRATCH_SIZE as u64),
        ("NEARFS_ARG_SIZE", abi::ARG_SIZE as u64),
        ("NEARFS_STACK_SIZE", abi::STACK_SIZE as u64),
        ("NEARFS_NO_NEXT", abi::NO_NEXT),
        ("NEARFS_HELPER_READ", helper::READ as u64),
        ("NEARFS_HELPER_WRITE", helper::WRITE as u64),
        ("NEARFS_HELPER_EMIT", helper::EMIT as u64),
        ("NEARFS_HELPER_MEMCMP", helper::MEMCMP as u64),
        ("NEARFS_HELPER_MEMMEM", helper::MEMMEM as u64),
        ("NEARFS_ERANGE", abi::errno::ERANGE as u64),
        ("NEARFS_EPERM", abi::errno::EPERM as u64),
        ("NEARFS_ENOSPC", abi::errno::ENOSPC as u64),
        ("NEARFS_EIO", abi::errno::EIO as u64),
        ("NEARFS_EINVAL", abi::errno::EINVAL as u64),
    ];
    let got: Vec<(String, u64)> = printed
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let want: Vec<(String, u64)> = want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(got, want);
}
