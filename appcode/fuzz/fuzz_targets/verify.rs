//! Any instruction stream: inlining and verifying must return within the verifier's
//! budget. Whatever is accepted is then run on both engines over a small file: it must
//! end (libFuzzer's timeout catches a hang), touch nothing outside its memory (a crash),
//! and compute the same on the JIT as on the interpreter.
#![no_main]

use std::time::Duration;

use appcode::{Extent, Limits, Mode, Program, Request, RunError, World, insn};
use blockdev::{BlockDevice, MemDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(insns) = insn::decode(&data[..data.len() / 8 * 8]) else {
        return;
    };
    let Ok(interp) = Program::from_insns("fuzz", &insns, Mode::Interpreter) else {
        return;
    };
    let jit = Program::from_insns("fuzz", &insns, Mode::Checked).expect("same verdict");
    let device = MemDevice::new(1 << 16);
    device.write_at(&[0x5a; 8192], 4096).unwrap();
    let extents = [Extent { file_off: 0, dev_off: 4096, len: 8192, unwritten: false }];
    let world = || World { device: &device, extents: &extents, file_size: 8192, range: 0..8192, writable: true };
    // Small count limits end runaway chains the same way on both engines; the wall clock
    // is the one limit that depends on an engine's speed, so a timeout proves nothing.
    let req = Request {
        arg: &[],
        limits: Limits {
            insns: 1 << 24,
            hops: 1 << 10,
            wall: Duration::from_secs(5),
            ..Limits::default()
        },
    };
    let a = interp.run(world(), &req);
    let b = jit.run(world(), &req);
    if matches!(a, Err(RunError::Timeout { .. })) || matches!(b, Err(RunError::Timeout { .. })) {
        return;
    }
    assert_eq!(a, b);
});
