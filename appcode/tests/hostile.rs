//! The hostile corpus (`tests/hostile/`): programs that try to break out, hang, leak or
//! crash. Each file's first line says what must happen:
//!
//! - `expect: reject KIND[|KIND...] [line=N]` — loading fails with that reason, or one of
//!   them (exhausting the verifier's budget may end by instruction count or by time on a
//!   loaded machine), and for C points at source line N;
//! - `expect: run KIND [LIMIT=VALUE ...]` — it loads, and a run under those limits fails
//!   with that error;
//! - `expect: result N` — it loads and runs to completion with r0 = N.
//!
//! Everything runs in this one process, on both engines; the last test shows it is still
//! healthy.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use appcode::asm::assemble;
use appcode::insn::Insn;
use appcode::program::ProgramError;
use appcode::{Limits, Mode, Program, Request};
use common::{TestFile, compile_file};

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

fn load(path: &Path, mode: Mode) -> Result<Program, ProgramError> {
    let name = path.file_stem().unwrap().to_str().unwrap();
    if path.extension().unwrap() == "c" {
        Program::from_elf(&compile_file(path, "v3"), None, mode)
    } else {
        let text = std::fs::read_to_string(path).unwrap();
        let insns = assemble(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        Program::from_insns(name, &insns, mode)
    }
}

fn limits(words: &[&str]) -> Limits {
    let mut l = Limits::default();
    for w in words {
        let (k, v) = w.split_once('=').expect("LIMIT=VALUE");
        let v: u64 = v.parse().unwrap();
        match k {
            "hops" => l.hops = v,
            "insns" => l.insns = v,
            "device_bytes" => l.device_bytes = v,
            "output_bytes" => l.output_bytes = v,
            "wall_ms" => l.wall = Duration::from_millis(v),
            "line" => {}
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
        let text = std::fs::read_to_string(path).unwrap();
        let header = text.lines().next().unwrap();
        let expect = header
            .split_once("expect: ")
            .unwrap_or_else(|| panic!("{name}: no expect line"))
            .1;
        let words: Vec<&str> = expect.split_whitespace().collect();
        for mode in [Mode::Checked, Mode::Interpreter] {
            let loaded = load(path, mode);
            let verdict = match (words[0], loaded) {
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
                        arg: &[],
                        limits: limits(&words[2..]),
                    };
                    match p.run(file.world(false), &req) {
                        Err(e) if format!("{e:?}").contains(words[1]) => Ok(()),
                        other => Err(format!("run ended with {other:?}")),
                    }
                }
                ("result", Ok(p)) => {
                    let want: i64 = words[1].parse().unwrap();
                    match p.run(file.world(false), &Request::default()) {
                        Ok(out) if out.result as i64 == want => Ok(()),
                        other => Err(format!("run ended with {other:?}")),
                    }
                }
                _ => panic!("{name}: bad expect line {header:?}"),
            };
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
