//! `bpf-progs/include/nearfs.h` declares the same ioctl structs as `nearfs_client::abi`:
//! a C program prints the header's offsets, sizes and command numbers, which must match.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nearfs_client::abi::{RunShape, cmd, off, run_error};

const PRINT: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include "nearfs.h"
#define O(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f));
#define S(s) printf(#s " %zu\n", sizeof(struct s));
#define C(c) printf(#c " %lu\n", (unsigned long)(c));
int main(void)
{
    O(nearfs_load, session) O(nearfs_load, offset) O(nearfs_load, len) O(nearfs_load, status)
    O(nearfs_load, prog_id) O(nearfs_load, log_len) O(nearfs_load, name) O(nearfs_load, data)
    O(nearfs_log, session) O(nearfs_log, offset) O(nearfs_log, len) O(nearfs_log, total)
    O(nearfs_log, text) O(nearfs_unload, prog_id) O(nearfs_list, cursor) O(nearfs_list, next)
    O(nearfs_list, count) O(nearfs_list, entries) O(nearfs_prog_info, owner)
    O(nearfs_prog_info, insns) O(nearfs_prog_info, max_insns) O(nearfs_prog_info, name)
    O(nearfs_run, prog_id) O(nearfs_run, range_off) O(nearfs_run, range_len)
    O(nearfs_run, arg_len) O(nearfs_run, out_len) O(nearfs_run, status) O(nearfs_run, run_error)
    O(nearfs_run, result) O(nearfs_run, insns) O(nearfs_run, hops) O(nearfs_run, device_bytes)
    O(nearfs_run, output_bytes) O(nearfs_run, more) O(nearfs_run, arg) O(nearfs_run, out)
    O(nearfs_run_small, prog_id) O(nearfs_run_small, range_off) O(nearfs_run_small, range_len)
    O(nearfs_run_small, arg_len) O(nearfs_run_small, out_len) O(nearfs_run_small, status)
    O(nearfs_run_small, run_error) O(nearfs_run_small, result) O(nearfs_run_small, insns)
    O(nearfs_run_small, hops) O(nearfs_run_small, device_bytes)
    O(nearfs_run_small, output_bytes) O(nearfs_run_small, more) O(nearfs_run_small, arg)
    O(nearfs_run_small, out)
    O(nearfs_more, token) O(nearfs_more, len) O(nearfs_more, left) O(nearfs_more, out)
    S(nearfs_version) S(nearfs_load) S(nearfs_log) S(nearfs_unload) S(nearfs_list)
    S(nearfs_prog_info) S(nearfs_run) S(nearfs_run_small) S(nearfs_more)
    C(NEARFS_IOC_VERSION) C(NEARFS_IOC_LOAD) C(NEARFS_IOC_LOG) C(NEARFS_IOC_UNLOAD)
    C(NEARFS_IOC_LIST) C(NEARFS_IOC_RUN) C(NEARFS_IOC_MORE) C(NEARFS_IOC_RUN_SMALL)
    C(NEARFS_ABI_VERSION) C(NEARFS_ABI_VERSIONS)
    C(NEARFS_RUN_E_INSNS) C(NEARFS_RUN_E_HOPS) C(NEARFS_RUN_E_DEVICE_BYTES)
    C(NEARFS_RUN_E_OUTPUT_BYTES) C(NEARFS_RUN_E_TIMEOUT) C(NEARFS_RUN_E_OUT_OF_RANGE)
    C(NEARFS_RUN_E_IO) C(NEARFS_RUN_E_FAULT) C(NEARFS_RUN_E_ARG) C(NEARFS_RUN_E_ACCESS)
    C(NEARFS_RUN_E_WRITE_BYTES)
    return 0;
}
"#;

#[test]
fn the_c_header_declares_the_same_structs() {
    let dir = std::env::temp_dir().join(format!("nearfs-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("h.c"), dir.join("h"));
    std::fs::write(&src, PRINT).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf-progs/include");
    let out = Command::new("clang")
        .arg("-I")
        .arg(include)
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
    std::fs::remove_dir_all(&dir).ok();
    let e = off::list::ENTRIES;
    let run_fields = [
        ("prog_id", off::run::PROG_ID),
        ("range_off", off::run::RANGE_OFF),
        ("range_len", off::run::RANGE_LEN),
        ("arg_len", off::run::ARG_LEN),
        ("out_len", off::run::OUT_LEN),
        ("status", off::run::STATUS),
        ("run_error", off::run::RUN_ERROR),
        ("result", off::run::RESULT),
        ("insns", off::run::INSNS),
        ("hops", off::run::HOPS),
        ("device_bytes", off::run::DEVICE_BYTES),
        ("output_bytes", off::run::OUTPUT_BYTES),
        ("more", off::run::MORE),
        ("arg", off::run::ARG),
    ];
    let run_names: Vec<(String, u64)> = ["nearfs_run", "nearfs_run_small"]
        .iter()
        .flat_map(|st| {
            run_fields
                .iter()
                .map(move |(f, at)| (format!("{st}.{f}"), *at as u64))
        })
        .collect();
    let want: Vec<(&str, u64)> = vec![
        ("nearfs_load.session", off::load::SESSION as u64),
        ("nearfs_load.offset", off::load::OFFSET as u64),
        ("nearfs_load.len", off::load::LEN as u64),
        ("nearfs_load.status", off::load::STATUS as u64),
        ("nearfs_load.prog_id", off::load::PROG_ID as u64),
        ("nearfs_load.log_len", off::load::LOG_LEN as u64),
        ("nearfs_load.name", off::load::NAME as u64),
        ("nearfs_load.data", off::load::DATA as u64),
        ("nearfs_log.session", off::log::SESSION as u64),
        ("nearfs_log.offset", off::log::OFFSET as u64),
        ("nearfs_log.len", off::log::LEN as u64),
        ("nearfs_log.total", off::log::TOTAL as u64),
        ("nearfs_log.text", off::log::TEXT as u64),
        ("nearfs_unload.prog_id", off::unload::PROG_ID as u64),
        ("nearfs_list.cursor", off::list::CURSOR as u64),
        ("nearfs_list.next", off::list::NEXT as u64),
        ("nearfs_list.count", off::list::COUNT as u64),
        ("nearfs_list.entries", e as u64),
        ("nearfs_prog_info.owner", off::list::E_OWNER as u64),
        ("nearfs_prog_info.insns", off::list::E_INSNS as u64),
        ("nearfs_prog_info.max_insns", off::list::E_MAX_INSNS as u64),
        ("nearfs_prog_info.name", off::list::E_NAME as u64),
        ("nearfs_run.out", RunShape::LARGE.out_at() as u64),
        ("nearfs_run_small.out", RunShape::SMALL.out_at() as u64),
        ("nearfs_more.token", off::more::TOKEN as u64),
        ("nearfs_more.len", off::more::LEN as u64),
        ("nearfs_more.left", off::more::LEFT as u64),
        ("nearfs_more.out", off::more::OUT as u64),
        ("nearfs_version", cmd::VERSION_SIZE as u64),
        ("nearfs_load", cmd::LOAD_SIZE as u64),
        ("nearfs_log", cmd::LOG_SIZE as u64),
        ("nearfs_unload", cmd::UNLOAD_SIZE as u64),
        ("nearfs_list", cmd::LIST_SIZE as u64),
        ("nearfs_prog_info", cmd::LIST_ENTRY_SIZE as u64),
        ("nearfs_run", cmd::RUN_SIZE as u64),
        ("nearfs_run_small", cmd::RUN_SMALL_SIZE as u64),
        ("nearfs_more", cmd::MORE_SIZE as u64),
        ("NEARFS_IOC_VERSION", u64::from(cmd::VERSION)),
        ("NEARFS_IOC_LOAD", u64::from(cmd::LOAD)),
        ("NEARFS_IOC_LOG", u64::from(cmd::LOG)),
        ("NEARFS_IOC_UNLOAD", u64::from(cmd::UNLOAD)),
        ("NEARFS_IOC_LIST", u64::from(cmd::LIST)),
        ("NEARFS_IOC_RUN", u64::from(cmd::RUN)),
        ("NEARFS_IOC_MORE", u64::from(cmd::MORE)),
        ("NEARFS_IOC_RUN_SMALL", u64::from(cmd::RUN_SMALL)),
        (
            "NEARFS_ABI_VERSIONS",
            u64::from(nearfs_client::abi::VERSIONS),
        ),
        (
            "NEARFS_ABI_VERSION",
            u64::from(nearfs_client::abi::ABI_VERSION),
        ),
        ("NEARFS_RUN_E_INSNS", u64::from(run_error::INSNS)),
        ("NEARFS_RUN_E_HOPS", u64::from(run_error::HOPS)),
        (
            "NEARFS_RUN_E_DEVICE_BYTES",
            u64::from(run_error::DEVICE_BYTES),
        ),
        (
            "NEARFS_RUN_E_OUTPUT_BYTES",
            u64::from(run_error::OUTPUT_BYTES),
        ),
        ("NEARFS_RUN_E_TIMEOUT", u64::from(run_error::TIMEOUT)),
        (
            "NEARFS_RUN_E_OUT_OF_RANGE",
            u64::from(run_error::OUT_OF_RANGE),
        ),
        ("NEARFS_RUN_E_IO", u64::from(run_error::IO)),
        ("NEARFS_RUN_E_FAULT", u64::from(run_error::FAULT)),
        ("NEARFS_RUN_E_ARG", u64::from(run_error::ARG)),
        ("NEARFS_RUN_E_ACCESS", u64::from(run_error::ACCESS)),
        (
            "NEARFS_RUN_E_WRITE_BYTES",
            u64::from(run_error::WRITE_BYTES),
        ),
    ];
    let got: BTreeMap<String, u64> = printed
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let want: BTreeMap<String, u64> = want
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(run_names)
        .collect();
    assert_eq!(got, want);
}
