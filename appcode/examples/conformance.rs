//! Measures rbpf 0.4.1, as it stands, against the public eBPF conformance vectors:
//!
//! ```sh
//! cargo run -p appcode --example conformance [-- DIR]   # default: ../shared/bpf_conformance/tests
//! ```
//!
//! Each vector is assembled with our assembler (checked against its `-- raw` encoding when
//! it has one) and classified: instructions outside ISA v1–v3 and helper calls are refused
//! with a reason. The rest run on rbpf's interpreter and its x86-64 JIT, each in a child
//! process (rbpf's JIT can corrupt its host, see DESIGN.md), and are compared with the
//! expected r0. This is the baseline the appcode runtime's rewrites and checks must fix;
//! it asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appcode::asm::assemble;
use appcode::insn::{self, Insn, check_isa, class, jmp};
use appcode::vectors::{self, Vector};

const CASE_ENV: &str = "APPCODE_CONFORMANCE_CASE";

/// Runs one vector on one engine (in the child process) and prints its r0.
fn run_case(path: &Path, engine: &str) {
    let v = Vector::parse(&std::fs::read_to_string(path).expect("read vector"));
    let prog = insn::encode(&assemble(&v.asm).expect("assembles"));
    let mut mem = v.mem.clone();
    let mut vm = match rbpf::EbpfVmRaw::new(Some(&prog)) {
        Ok(vm) => vm,
        Err(e) => return println!("REJECTED {e}"),
    };
    let result = if engine == "jit" {
        if let Err(e) = vm.jit_compile() {
            return println!("REJECTED {e}");
        }
        // SAFETY: this child process exists to contain whatever the JIT's output does.
        unsafe { vm.execute_program_jit(&mut mem) }
    } else {
        vm.execute_program(&mut mem)
    };
    match result {
        Ok(r0) => println!("R0 {r0:#x}"),
        Err(e) => println!("ERROR {e}"),
    }
}

/// Runs a vector in a child process with a time limit.
fn spawn(path: &Path, engine: &str) -> String {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(CASE_ENV, format!("{engine}:{}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = child
                    .wait_with_output()
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                let out = String::from_utf8_lossy(&out).trim().to_string();
                return if out.is_empty() {
                    format!("CRASHED ({status})")
                } else {
                    out
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return "HUNG (killed after 5 s)".into();
            }
        }
    }
}

/// Why we refuse a program before running it, if we do.
fn refusal(prog: &[Insn]) -> Option<String> {
    let mut slots = prog.iter().enumerate();
    while let Some((pc, i)) = slots.next() {
        if let Err(e) = check_isa(i) {
            return Some(format!("insn {pc}: {e}"));
        }
        if i.op == class::JMP | jmp::CALL && i.src == insn::CALL_HELPER {
            return Some(format!(
                "insn {pc}: helper {} is not a nearfs helper",
                i.imm
            ));
        }
        if i.is_lddw() {
            slots.next();
        }
    }
    None
}

fn main() {
    if let Ok(case) = std::env::var(CASE_ENV) {
        let (engine, path) = case.split_once(':').expect("engine:path");
        return run_case(Path::new(path), engine);
    }
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(vectors::default_dir);
    let files = vectors::files(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let (mut refused, mut runnable, mut exact) = (0, 0, [0usize; 2]);
    for path in &files {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let v = Vector::parse(&std::fs::read_to_string(path).expect("read"));
        let prog = match assemble(&v.asm) {
            Ok(p) => p,
            Err(e) => {
                println!("{name:32} ASSEMBLER ERROR {e}");
                continue;
            }
        };
        if let Some(raw) = &v.raw {
            let ours: Vec<u64> = insn::encode(&prog)
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("slot")))
                .collect();
            if &ours != raw {
                println!("{name:32} ENCODING DIFFERS from -- raw");
            }
        }
        if let Some(why) = refusal(&prog) {
            refused += 1;
            println!("{name:32} refused: {why}");
            continue;
        }
        runnable += 1;
        let want = v.result.map(|r| format!("R0 {r:#x}")).unwrap_or_default();
        for (k, engine) in ["interp", "jit"].into_iter().enumerate() {
            let got = spawn(path, engine);
            if got == want {
                exact[k] += 1;
            } else {
                println!("{name:32} {engine:6} got {got}, expected {want}");
            }
        }
    }
    println!(
        "\n{} vectors: {refused} refused with a reason; {runnable} run (ISA v1–v3, no helpers): \
         interpreter exact on {}, JIT exact on {}",
        files.len(),
        exact[0],
        exact[1]
    );
}
