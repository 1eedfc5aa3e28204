//! Programs compiled by clang, verified and run over an in-memory file on both engines.

mod common;

use appcode::{Mode, Program, Request};
use common::{TestFile, compile_file, progs_dir};

fn load(file: &str, name: &str, mode: Mode) -> Program {
    let obj = compile_file(&progs_dir().join(file), "v3");
    Program::from_elf(&obj, Some(name), mode).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn bytecount_counts_across_hops() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let want = data.iter().filter(|&&b| b == 3).count() as u64;
    let file = TestFile::new(&data);
    for mode in [Mode::Jit, Mode::Interpreter] {
        let p = load("bytecount.c", "bytecount", mode);
        let out = p
            .run(
                file.world(false),
                &Request {
                    arg: &[3],
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(out.result, want, "{mode:?}");
        assert_eq!(out.costs.hops, 2);
        assert_eq!(out.costs.device_bytes, data.len() as u64);
        println!("{:?} {:?}", p.verified(), out.costs);
    }
}
