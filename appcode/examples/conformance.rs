//! Measures nearfs's checked engine and rbpf 0.4.1 against the public eBPF conformance
//! vectors:
//!
//! ```sh
//! cargo run -p appcode --example conformance [-- [--rewrite] [--check] [DIR]]
//! ```
//!
//! DIR defaults to `$NEARFS_CONFORMANCE_DIR` or ../shared/bpf_conformance/tests.
//! `--rewrite` runs each program through `appcode::rewrite::for_rbpf` before rbpf gets it;
//! `--check` exits non-zero unless every vector assembles, every refusal has a reason, and
//! every engine is exact on every runnable vector (`tests/conformance.rs` runs it that way).
//!
//! Each vector is assembled with our assembler (checked against its `-- raw` encoding when
//! it has one) and classified: instructions outside ISA v1–v3 and helper calls are refused
//! with a reason. The rest run on the checked engine, in this process and without the
//! verifier (`appcode::program::run_unverified`: its run-time checks alone keep the process
//! safe), and on rbpf's interpreter and x86-64 JIT, each in a child process (rbpf's JIT can
//! corrupt its host, see DESIGN.md); each answer is compared with the expected r0. Without
//! `--rewrite` it shows what rbpf 0.4.1 gets wrong on its own. As the suite's convention
//! says, r1 points at the memory and r2 holds its length (a `mov r2, LEN` is put in front of
//! every program for rbpf).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appcode::asm::assemble;
use appcode::insn::{self, Insn, SRC_K, alu, check_isa, class, jmp};
use appcode::vectors::{self, Vector};
use appcode::{Limits, program, rewrite};

const CASE_ENV: &str = "APPCODE_CONFORMANCE_CASE";
const REWRITE_ENV: &str = "APPCODE_CONFORMANCE_REWRITE";

/// Runs one vector on one engine (in the child process) and prints its r0.
fn run_case(path: &Path, engine: &str) {
    let v = Vector::parse(&std::fs::read_to_string(path).expect("read vector"));
    let mut mem = v.mem.clone();
    let set_len = Insn::new(class::ALU64 | alu::MOV | SRC_K, 2, 0, 0, mem.len() as i32);
    let mut prog: Vec<Insn> = [set_len]
        .into_iter()
        .chain(assemble(&v.asm).expect("assembles"))
        .collect();
    if std::env::var_os(REWRITE_ENV).is_some() {
        prog = match rewrite::for_rbpf(&prog) {
            Ok(p) => p,
            Err(e) => return println!("REJECTED {e}"),
        };
    }
    let prog = insn::encode(&prog);
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

/// Runs a vector on the checked engine, here, without the verifier.
fn checked(prog: &[Insn], mem: &[u8]) -> String {
    let limits = Limits {
        insns: 1 << 24,
        ..Limits::default()
    };
    match program::run_unverified(prog, mem, limits) {
        Ok(Ok(r0)) => format!("R0 {r0:#x}"),
        Ok(Err(e)) => format!("ERROR {e}"),
        Err(e) => format!("REJECTED {e}"),
    }
}

/// Runs a vector in a child process with a time limit.
fn spawn(path: &Path, engine: &str, rewrite: bool) -> String {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(CASE_ENV, format!("{engine}:{}", path.display()))
        .envs(rewrite.then_some((REWRITE_ENV, "1")))
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rewrite = args.iter().any(|a| a == "--rewrite");
    let check = args.iter().any(|a| a == "--check");
    let dir = match args.iter().find(|a| !a.starts_with("--")) {
        Some(d) => PathBuf::from(d),
        None => vectors::dir().unwrap_or_else(|why| {
            println!("skipped: {why}");
            std::process::exit(0)
        }),
    };
    let mut broken = 0;
    let files = vectors::files(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let (mut refused, mut runnable, mut exact) = (0, 0, [0usize; 3]);
    for path in &files {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let v = Vector::parse(&std::fs::read_to_string(path).expect("read"));
        let prog = match assemble(&v.asm) {
            Ok(p) => p,
            Err(e) => {
                println!("{name:32} ASSEMBLER ERROR {e}");
                broken += 1;
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
                broken += 1;
            }
        }
        if let Some(why) = refusal(&prog) {
            refused += 1;
            println!("{name:32} refused: {why}");
            continue;
        }
        runnable += 1;
        let want = v.result.map(|r| format!("R0 {r:#x}")).unwrap_or_default();
        for (k, engine) in ["checked", "interp", "jit"].into_iter().enumerate() {
            let got = match engine {
                "checked" => checked(&prog, &v.mem),
                _ => spawn(path, engine, rewrite),
            };
            if got == want {
                exact[k] += 1;
            } else {
                println!("{name:32} {engine:6} got {got}, expected {want}");
            }
        }
    }
    println!(
        "\n{} vectors: {refused} refused with a reason; {runnable} run (ISA v1–v3, no helpers): \
         checked engine exact on {}, rbpf's interpreter on {}, rbpf's JIT on {}",
        files.len(),
        exact[0],
        exact[1],
        exact[2]
    );
    if check {
        if broken > 0 || exact != [runnable; 3] {
            println!("CHECK FAILED: want every vector assembled and every engine exact on all");
            std::process::exit(1);
        }
        println!("check passed");
    }
}
