//! Objects compiled by clang, loaded and linked by `appcode::elf`, then run on rbpf's
//! interpreter after rewriting: the linked stream computes what the C says.

use appcode::elf::{self, LoadError};
use appcode::{insn, rewrite};
use common::compile;

mod common;

const PROGRAM: &str = r#"
static const unsigned long long table[4] = {3, 5, 7, 11};
static __attribute__((noinline)) unsigned long long sq(unsigned long long x) {
    return x * x + table[x & 3];
}
unsigned long long counter;
__attribute__((section("nearfs/test"), used)) unsigned long long prog(void *ctx) {
    counter++;
    return sq(4) + sq(5);
}
"#;

#[test]
fn clang_objects_link_calls_and_globals_and_compute_what_the_c_says() {
    for cpu in ["v1", "v2", "v3"] {
        let loaded =
            elf::load(&compile(PROGRAM, cpu)).unwrap_or_else(|e| panic!("-mcpu={cpu}: {e}"));
        assert_eq!(loaded.programs.len(), 1);
        let prog = &loaded.programs[0];
        assert_eq!(prog.name, "test");
        assert_eq!(
            prog.data_refs.len(),
            2,
            "-mcpu={cpu}: counter and table: {:?}",
            prog.data_refs
        );
        let names: Vec<&str> = loaded.regions.iter().map(|r| r.name.as_str()).collect();
        assert!(
            names.iter().any(|n| n.starts_with(".bss"))
                && names.iter().any(|n| n.starts_with(".rodata")),
            "{names:?}"
        );

        // Bind each global to a buffer of ours, as instantiation will.
        let mut regions: Vec<Vec<u8>> = loaded.regions.iter().map(|r| r.bytes.clone()).collect();
        let mut insns = prog.insns.clone();
        for r in &prog.data_refs {
            let addr = regions[r.region.index()].as_ptr() as u64 + r.offset;
            insns[r.insn].imm = addr as u32 as i32;
            insns[r.insn + 1].imm = (addr >> 32) as u32 as i32;
        }
        let code = insn::encode(&rewrite::for_rbpf(&insns).unwrap());
        let mut vm = rbpf::EbpfVmRaw::new(Some(&code)).unwrap();
        for r in &mut regions {
            let start = r.as_mut_ptr() as u64;
            vm.register_allowed_memory(start..start + r.len() as u64);
        }
        let r0 = vm.execute_program(&mut []).unwrap();
        // sq(4) + sq(5) = (16 + table[0]) + (25 + table[1])
        assert_eq!(r0, 49, "-mcpu={cpu}");
        let bss = loaded
            .regions
            .iter()
            .position(|r| r.name.starts_with(".bss"))
            .unwrap();
        assert_eq!(
            u64::from_le_bytes(regions[bss][..8].try_into().unwrap()),
            1,
            "counter++ landed in .bss"
        );
    }
}

#[test]
fn malformed_objects_are_refused_with_a_reason() {
    assert!(matches!(
        elf::load(b"not an elf at all"),
        Err(LoadError::Malformed(_))
    ));
    let good = compile(PROGRAM, "v3");
    for n in (0..good.len()).step_by(37) {
        assert!(
            elf::load(&good[..n]).is_err(),
            "accepted a prefix of {n} bytes"
        );
    }
    let plain = compile("int f(int x) { return x + 1; }", "v3");
    assert_eq!(elf::load(&plain), Err(LoadError::NoProgram));
    let long = format!(
        "#include \"nearfs.h\"\nNEARFS_PROG(\"{}\") long f(struct nearfs_ctx *c) {{ return 0; }}",
        "n".repeat(70)
    );
    assert!(matches!(
        elf::load(&compile(&long, "v3")),
        Err(LoadError::BadName { .. })
    ));
    let mut wrong_machine = good.clone();
    wrong_machine[18] = 62; // e_machine = EM_X86_64
    assert_eq!(elf::load(&wrong_machine), Err(LoadError::NotBpf));
}
