//! Any instruction stream over any file and argument: inlining and verifying must return
//! within the verifier's budget. Whatever is accepted then runs on the checked engine with
//! the oracle "an accepted program never faults": an access the engine refuses, code the
//! verifier never reached, or a helper panic means the verifier was wrong somewhere. The
//! same run on rbpf's interpreter must compute the same.
//!
//! Input: file length (u16), argument length (u16, at most 1024), the file's bytes, the
//! argument's bytes, then the program (8 bytes per slot).
#![no_main]

use std::time::Duration;

use appcode::{Extent, Limits, Mode, Outcome, Program, Request, RunError, World, insn};
use blockdev::{BlockDevice, MemDevice};
use libfuzzer_sys::fuzz_target;

/// A run's result without its instruction count, which the engines count differently
/// (the checked one as they execute, rbpf's as verified worst cases).
fn comparable(r: &Result<Outcome, RunError>) -> Result<(u64, &[u8], u64, u64), &RunError> {
    r.as_ref()
        .map(|o| (o.result, o.output.as_slice(), o.costs.hops, o.costs.device_bytes))
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let file_len = usize::from(u16::from_le_bytes([head[0], head[1]])).min(rest.len());
    let (file, rest) = rest.split_at(file_len);
    let arg_len = usize::from(u16::from_le_bytes([head[2], head[3]]))
        .min(appcode::abi::ARG_SIZE)
        .min(rest.len());
    let (arg, code) = rest.split_at(arg_len);
    let Some(insns) = insn::decode(&code[..code.len() / 8 * 8]) else {
        return;
    };
    let Ok(checked) = Program::from_insns("fuzz", &insns, Mode::Checked) else {
        return;
    };
    let interp = Program::from_insns("fuzz", &insns, Mode::Interpreter).expect("same verdict");
    let size = file.len() as u64;
    let device = MemDevice::new(4096 + size.next_multiple_of(4096));
    device.write_at(file, 4096).unwrap();
    let extents = [Extent { file_off: 0, dev_off: 4096, len: size.next_multiple_of(4096), unwritten: false }];
    let world = || World { device: &device, extents: &extents, file_size: size, range: 0..size, writable: true };
    // Small count limits end runaway chains the same way on both engines; the wall clock
    // and the instruction count are engine-specific, so those endings prove nothing.
    let req = Request {
        arg,
        limits: Limits { insns: 1 << 28, hops: 1 << 10, wall: Duration::from_secs(5), ..Limits::default() },
    };
    let a = checked.run(world(), &req);
    if let Err(e @ (RunError::Access { .. } | RunError::Unverified { .. } | RunError::Fault(_))) = &a {
        panic!("an accepted program faulted: {e}\n{}", appcode::disasm::listing(&insns));
    }
    let b = interp.run(world(), &req);
    let inconclusive = |r: &Result<Outcome, RunError>| {
        matches!(r, Err(RunError::Timeout { .. } | RunError::InsnLimit { .. }))
    };
    if inconclusive(&a) || inconclusive(&b) {
        return;
    }
    assert_eq!(comparable(&a), comparable(&b), "{}", appcode::disasm::listing(&insns));
});
