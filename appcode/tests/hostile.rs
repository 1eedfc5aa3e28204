//! The hostile corpus (`tests/hostile/`): programs that try to break out, hang, leak or
//! crash. Each file's first line says what must happen:
//!
//! - `expect: reject KIND[|KIND...] [line=N]` — loading fails with that reason, or one of
//!   them (exhausting the verifier's budget may end by instruction count or by time on a
//!   loaded machine), and for C points at source line N;
//! - `expect: run KIND [LIMIT=VALUE ...] [writable]` — it loads, and a run under those
//!   limits (with write intent if `writable`) fails with that error;
//! - `expect: result N [zeros=K]` — it loads and runs to completion with r0 = N (and emits
//!   exactly K zero bytes).
//!
//! Everything runs in this one process, on the checked engine and on rbpf's interpreter;
//! the last test shows it is still healthy. Then the second line of defence alone: with the
//! verifier's memory checks off, every program it would have refused for memory ends in a
//! run error on the checked engine.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use appcode::asm::assemble;
use appcode::insn::Insn;
use appcode::program::ProgramError;
use appcode::verify::Checks;
use appcode::{Limits, Mode, Options, Program, Request};
use common::{TestFile, compile_file, shapes};

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("s" | "c")))
        .collect();
    files.sort();
    files
}

fn load(path: &Path, options: impl Into<Options>) -> Result<Program, ProgramError> {
    let name = path.file_stem().unwrap().to_str().unwrap();
    if path.extension().unwrap() == "c" {
        Program::from_elf(&compile_file(path, "v3"), None, options)
    } else {
        let text = std::fs::read_to_string(path).unwrap();
        let insns = assemble(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        Program::from_insns(name, &insns, options)
    }
}

/// The first line's words after `expect: `.
fn expectation(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let header = text.lines().next().unwrap();
    let expect = header
        .split_once("expect: ")
        .unwrap_or_else(|| panic!("{}: no expect line", path.display()))
        .1;
    expect.split_whitespace().map(String::from).collect()
}

fn limits(words: &[&str]) -> Limits {
    let mut l = Limits::default();
    for w in words.iter().filter(|w| **w != "writable") {
        let (k, v) = w.split_once('=').expect("LIMIT=VALUE");
        let v: u64 = v.parse().unwrap();
        match k {
            "hops" => l.hops = v,
            "insns" => l.insns = v,
            "device_bytes" => l.device_bytes = v,
            "output_bytes" => l.output_bytes = v,
            "write_bytes" => l.write_bytes = v,
            "wall_ms" => l.wall = Duration::from_millis(v),
            "line" | "zeros" => {}
            _ => panic!("unknown limit {k}"),
        }
    }
    l
}

#[test]
fn every_hostile_program_is_stopped_with_its_reason() {
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8 + 1).collect();
    let file = TestFile::new(&data);
    let files = corpus();
    assert!(files.len() >= 30, "the corpus has {} programs", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let words = expectation(path);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        for mode in [Mode::Checked, Mode::Interpreter] {
            let verdict = judge(load(path, mode), &words, &file, &[]);
            if let Err(why) = verdict {
                failures.push(format!("{name} ({mode:?}): {why}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn streams_too_large_or_with_impossible_registers_are_refused() {
    let mut huge = vec![Insn::new(0xb7, 0, 0, 0, 0); appcode::elf::MAX_INSNS];
    huge.push(Insn::new(0x95, 0, 0, 0, 0));
    let e = Program::from_insns("huge", &huge, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("TooLarge"), "{e}");
    let r11 = [Insn::new(0xb7, 11, 0, 0, 0), Insn::new(0x95, 0, 0, 0, 0)];
    let e = Program::from_insns("r11", &r11, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("BadRegister"), "{e}");
    // Found by the verify fuzz target: the inliner's frame scan indexed by register.
    let copy_fp = [Insn::new(0xbf, 12, 10, 0, 0), Insn::new(0x95, 0, 0, 0, 0)];
    let e = Program::from_insns("r12", &copy_fp, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("BadRegister"), "{e}");
    let torn_lddw = [Insn::new(0x18, 0, 0, 0, 1)];
    let e = Program::from_insns("torn", &torn_lddw, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("Unsupported"), "{e}");
    // Every slot a function calling the next: a chain 65,535 calls deep, which inlining
    // by recursion would follow until the thread's stack ran out.
    let mut chain = vec![Insn::new(0x85, 0, 1, 0, 0); appcode::elf::MAX_INSNS - 1];
    chain.push(Insn::new(0x95, 0, 0, 0, 0));
    let e = Program::from_insns("chain", &chain, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("TooDeep"), "{e}");
}

#[test]
fn the_process_stays_healthy_after_the_corpus() {
    every_hostile_program_is_stopped_with_its_reason();
    let prog = assemble("ldxdw %r2, [%r1]\nldxb %r0, [%r2+4095]\nexit").unwrap();
    let data = vec![9u8; 4096];
    let file = TestFile::new(&data);
    for mode in [Mode::Checked, Mode::Interpreter] {
        let p = Program::from_insns("last_byte", &prog, mode).unwrap();
        let out = p.run(file.world(false), &Request::default()).unwrap();
        assert_eq!(out.result, 9);
    }
}

/// What a program's header says for `key` (`expect` or `unchecked`): the words after it.
fn header(path: &Path, key: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let pattern = format!("{key}: ");
    text.lines().take(2).find_map(|l| {
        let (_, rest) = l.split_once(&pattern)?;
        Some(rest.split_whitespace().map(String::from).collect())
    })
}

/// Whether `loaded` and a run of it (with `arg`, writable) came out as `words` say.
fn judge(
    loaded: Result<Program, ProgramError>,
    words: &[&str],
    file: &TestFile,
    arg: &[u8],
) -> Result<(), String> {
    match (words[0], loaded) {
        ("reject", Err(e)) => {
            let shown = format!("{e:?}");
            let line = words[2..]
                .iter()
                .find_map(|w| w.strip_prefix("line="))
                .map(|n| n.parse::<u32>().unwrap());
            let at = match &e {
                ProgramError::Rejected(d) => d.source.as_ref().map(|l| l.line),
                _ => None,
            };
            if !words[1].split('|').any(|kind| shown.contains(kind)) {
                Err(format!("rejected for another reason: {e}"))
            } else if line.is_some() && line != at {
                Err(format!("points at line {at:?}, not {line:?}: {e}"))
            } else {
                Ok(())
            }
        }
        ("reject", Ok(_)) => Err("accepted".into()),
        (_, Err(e)) => Err(format!("rejected: {e}")),
        ("run", Ok(p)) => {
            let req = Request {
                arg,
                limits: limits(&words[2..]),
            };
            match p.run(file.world(words.contains(&"writable")), &req) {
                Err(e) if format!("{e:?}").contains(words[1]) => Ok(()),
                other => Err(format!("run ended with {other:?}")),
            }
        }
        ("result", Ok(p)) => {
            let want: i64 = words[1].parse().unwrap();
            let zeros = words[2..]
                .iter()
                .find_map(|w| w.strip_prefix("zeros="))
                .map(|n| vec![0u8; n.parse().unwrap()]);
            let req = Request {
                arg,
                ..Request::default()
            };
            match p.run(file.world(false), &req) {
                Ok(out)
                    if out.result as i64 == want
                        && zeros.as_ref().is_none_or(|z| out.output == *z) =>
                {
                    Ok(())
                }
                other => Err(format!("run ended with {other:?}")),
            }
        }
        _ => panic!("bad expectation {words:?}"),
    }
}

/// The verifier's memory checks off: every program it refuses for where its accesses go
/// says (`unchecked:`) what the checked engine alone does with it, and does that. Most
/// end in `Access`; a few happen to stay inside their memory with this file and argument
/// (the engine lets them, as it should); the rest are still refused for something else.
#[test]
fn without_the_verifiers_memory_checks_the_engine_stops_every_stray_access() {
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8 + 1).collect();
    let file = TestFile::new(&data);
    let unchecked = Options {
        mode: Mode::Checked,
        checks: Checks { memory: false },
    };
    let memory = [
        "OutOfBounds",
        "NotPointer",
        "ReadOnly",
        "HelperArg",
        "PointerOffset",
        "CtxField",
    ];
    let (mut judged, mut stopped) = (0, 0);
    let mut failures = Vec::new();
    for path in corpus() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let expect = header(&path, "expect").unwrap();
        let refused_for_memory =
            expect[0] == "reject" && expect[1].split('|').all(|k| memory.contains(&k));
        let Some(words) = header(&path, "unchecked") else {
            if refused_for_memory {
                failures.push(format!("{name}: says nothing for unchecked"));
            }
            continue;
        };
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        judged += 1;
        stopped += usize::from(words == ["run", "Access"]);
        if let Err(why) = judge(load(&path, unchecked), &words, &file, &[0xff; 64]) {
            failures.push(format!("{name}: {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        judged >= 30 && stopped >= 20,
        "{judged} judged, {stopped} stopped"
    );
}

#[test]
fn nothing_one_run_leaves_on_the_stack_reaches_the_next() {
    // Fills the whole stack with 0xaa...
    let mut fill = String::new();
    for k in 1..=64 {
        fill.push_str(&format!(
            "lddw %r1, 0xaaaaaaaaaaaaaaaa\nstxdw [%r10-{}], %r1\n",
            8 * k
        ));
    }
    fill.push_str("mov %r0, 0\nexit");
    let fill = assemble(&fill).unwrap();
    // ...then a read that fails leaves its buffer zeroed, and the whole stack reads zero.
    let leak = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/class_helper_fails_dst_zeroed.s"),
    )
    .unwrap();
    let leak = assemble(&leak).unwrap();
    let file = TestFile::new(&[7u8; 4096]);
    for mode in [Mode::Checked, Mode::Interpreter] {
        let a = Program::from_insns("fill", &fill, mode).unwrap();
        let b = Program::from_insns("leak", &leak, mode).unwrap();
        for _ in 0..3 {
            a.run(file.world(false), &Request::default()).unwrap();
            let out = b.run(file.world(false), &Request::default()).unwrap();
            assert_eq!(out.output, vec![0u8; 480], "{mode:?}");
        }
    }
}

#[test]
fn programs_larger_than_rbpfs_jit_can_hold_run_on_the_checked_engine() {
    // 20,000 additions: far past the one 4 KiB page rbpf's JIT compiles into.
    let mut insns = vec![Insn::new(0xb7, 0, 0, 0, 0)];
    insns.extend(std::iter::repeat_n(Insn::new(0x07, 0, 0, 0, 3), 20_000));
    insns.push(Insn::new(0x95, 0, 0, 0, 0));
    let file = TestFile::new(&[0u8; 4096]);
    let p = Program::from_insns("long", &insns, Mode::Checked).unwrap();
    let out = p.run(file.world(false), &Request::default()).unwrap();
    assert_eq!(out.result, 60_000);
    assert_eq!(out.costs.insns, 20_002);
    // rbpf's JIT refuses it with an error, not a panic.
    let e = Program::from_insns("long", &insns, Mode::UncheckedJit).unwrap_err();
    assert!(matches!(e, ProgramError::Engine(_)), "{e}");
}

#[test]
fn the_largest_program_the_verifier_accepts_compiles() {
    // Alternating loads, adds, forward branches and stores, up to the limit: the checked
    // engine's capacity is the verifier's.
    let n = appcode::verify::MAX_INSNS;
    let mut p = shapes::checked_accesses(n);
    assert_eq!(p.len(), n);
    let prog = Program::from_insns("largest", &p, Mode::Checked).unwrap();
    let file = TestFile::new(&[0u8; 4096]);
    prog.run(file.world(false), &Request::default()).unwrap();
    p.insert(0, Insn::new(0xb7, 0, 0, 0, 0));
    let e = Program::from_insns("larger", &p, Mode::Checked).unwrap_err();
    assert!(format!("{e:?}").contains("TooLarge"), "{e}");
}

#[test]
fn programs_too_costly_to_compile_are_refused_before_compiling() {
    // Each shape verifies in well under a second and compiled once in 2 to 34 s and up to
    // 4.4 GB (register allocation grows with blocks times values).
    let n = appcode::verify::MAX_INSNS;
    let refused = |name: &str, insns: &[Insn], why: &str| match Program::from_insns(
        name,
        insns,
        Mode::Checked,
    ) {
        Err(ProgramError::Engine(e)) => assert!(e.contains(why), "{name}: {e}"),
        Err(e) => panic!("{name}: refused for another reason: {e}"),
        Ok(_) => panic!("{name}: compiled"),
    };
    refused("heads", &shapes::loop_heads(n, n), "loop heads");
    refused(
        "one head",
        &shapes::jumps_into_one(n, 20_000),
        "jumps enter one",
    );
    refused(
        "resolved",
        &shapes::resolved_loads(n),
        "too costly to compile",
    );
    // Up to the bounds they compile and run.
    let file = TestFile::new(&[0u8; 4096]);
    for (name, insns) in [
        ("4096 heads", shapes::loop_heads(10_000, 4096)),
        ("4096 jumps in", shapes::jumps_into_one(10_000, 4095)),
    ] {
        let p = Program::from_insns(name, &insns, Mode::Checked).unwrap();
        p.run(file.world(false), &Request::default()).unwrap();
    }
}

#[test]
fn dead_code_full_of_backward_jumps_costs_the_verifier_little() {
    // Only the first two slots run; the rest is a chain of backward jumps that the
    // dataflow pass still analyses. Solved by sweeps, each sweep moved one step up the
    // chain: about 20 s for the largest program in a release build.
    let mut insns = vec![
        Insn::new(0xb7, 0, 0, 0, 0),
        Insn::new(0x95, 0, 0, 0, 0),
        Insn::new(0x15, 0, 0, -1, 0),
    ];
    insns.resize(appcode::verify::MAX_INSNS, Insn::new(0x05, 0, 0, -2, 0));
    let p = Program::from_insns("chain", &insns, Mode::Checked).unwrap();
    let file = TestFile::new(&[0u8; 4096]);
    assert_eq!(
        p.run(file.world(false), &Request::default())
            .unwrap()
            .result,
        0
    );
}

#[test]
fn rbpfs_engines_refuse_programs_past_their_i16_jumps() {
    // rbpf jumps with an i16 instruction pointer: past slot 32,767 its interpreter lands
    // elsewhere (or panics). The checked engine runs the program; rbpf refuses it.
    let mut insns = vec![Insn::new(0xb7, 0, 0, 0, 7)];
    insns.extend(std::iter::repeat_n(Insn::new(0x07, 0, 0, 0, 1), 32_800));
    insns.extend([
        Insn::new(0x05, 0, 0, 1, 0),
        Insn::new(0xb7, 0, 0, 0, 5),
        Insn::new(0x95, 0, 0, 0, 0),
    ]);
    let file = TestFile::new(&[0u8; 4096]);
    let p = Program::from_insns("long", &insns, Mode::Checked).unwrap();
    assert_eq!(
        p.run(file.world(false), &Request::default())
            .unwrap()
            .result,
        32_807
    );
    for mode in [Mode::Interpreter, Mode::UncheckedJit] {
        let e = Program::from_insns("long", &insns, mode).unwrap_err();
        assert!(matches!(e, ProgramError::Engine(_)), "{mode:?}: {e}");
    }
}
