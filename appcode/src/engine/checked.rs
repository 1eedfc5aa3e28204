//! The checked engine: programs compiled by Cranelift ([`super::translate`]) with every
//! memory access bounds-checked and every block metered, run over a run's [`Arena`].
//!
//! Compiled code talks to the runtime through a [`Vm`] record and three trampolines: one
//! that calls a helper (charging it first), one that grants more fuel (checking the
//! instruction limit and the clock), and one that resolves an access the verifier could
//! not pin to one area. Every way out of compiled code is a return with a [`Status`]; a
//! failed check is a run error, never a signal.

use std::sync::OnceLock;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{AbiParam, Function, Signature, UserFuncName};
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{Context, FinalizedMachReloc};

use super::code::Code;
use super::translate::{Plan, translate};
use crate::abi::ctx;
use crate::helpers::Helper;
use crate::insn::Insn;
use crate::memory::{Addressing, Arena, Globals, Memory, guest};
use crate::run::{Run, RunError};
use crate::verify::Target;

#[cfg(not(target_endian = "little"))]
compile_error!(
    "the checked engine translates eBPF's byte-order instructions for little-endian hosts"
);

/// How compiled code left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub(super) enum Status {
    Exit = 0,
    Access = 1,
    Unverified = 2,
    Stopped = 3,
    /// Out of fuel at a loop head: grant more and call again to resume.
    Yield = 4,
}

/// The record compiled code reads and writes, at the offsets in [`vm`].
#[repr(C)]
pub(super) struct Vm {
    /// Host address of guest address 0 for the arena's areas (wrapping).
    bias: u64,
    /// Fuel left in the current grant.
    fuel: i64,
    r0: u64,
    /// Slot of the failed access, trap or current helper call.
    pc: u64,
    /// Guest address of a failed access.
    addr: u64,
    /// Size of a failed access, | 0x100 for a write.
    access: u64,
    /// Nonzero once a trampoline decided the run must stop.
    stop: u64,
    /// 0 to start the program; after a yield, where to resume (see `translate`).
    resume: u64,
    /// r0–r9, saved by a yield and restored on resuming.
    regs: [u64; 10],
    host: *mut Host<'static, 'static>,
}

/// Byte offsets of [`Vm`]'s fields, as the translator uses them.
pub(super) mod vm {
    pub const BIAS: i32 = 0;
    pub const FUEL: i32 = 8;
    pub const R0: i32 = 16;
    pub const PC: i32 = 24;
    pub const ADDR: i32 = 32;
    pub const ACCESS: i32 = 40;
    pub const STOP: i32 = 48;
    pub const RESUME: i32 = 56;
    pub const REGS: i32 = 64;
}

const _: () = {
    assert!(std::mem::offset_of!(Vm, bias) == vm::BIAS as usize);
    assert!(std::mem::offset_of!(Vm, fuel) == vm::FUEL as usize);
    assert!(std::mem::offset_of!(Vm, r0) == vm::R0 as usize);
    assert!(std::mem::offset_of!(Vm, pc) == vm::PC as usize);
    assert!(std::mem::offset_of!(Vm, addr) == vm::ADDR as usize);
    assert!(std::mem::offset_of!(Vm, stop) == vm::STOP as usize);
    assert!(std::mem::offset_of!(Vm, resume) == vm::RESUME as usize);
    assert!(std::mem::offset_of!(Vm, regs) == vm::REGS as usize);
};

/// What helpers of one invocation work on.
struct Host<'r, 'w> {
    run: &'r mut Run<'w>,
    mem: Memory<'r>,
}

/// Addresses compiled code calls or adds, fixed when it is compiled.
#[derive(Clone, Copy)]
pub(super) struct Trampolines {
    pub helper: extern "C" fn(*mut Vm, &'static Helper, u64, u64, u64, u64, u64) -> u64,
    pub resolve: extern "C" fn(*mut Vm, u64, u64, u64) -> u64,
    /// Host address of guest address 0 for the globals (blob − `guest::GLOBALS`).
    pub globals_bias: u64,
}

/// A compiled program.
pub(crate) struct Compiled {
    code: Code,
    entry: unsafe extern "C" fn(*mut Vm) -> u64,
}

fn isa() -> Result<&'static OwnedTargetIsa, String> {
    static ISA: OnceLock<Result<OwnedTargetIsa, String>> = OnceLock::new();
    ISA.get_or_init(|| {
        let mut b = settings::builder();
        let set = |b: &mut settings::Builder, k: &str, v: &str| {
            b.set(k, v)
                .map_err(|e| format!("cranelift setting {k}={v}: {e}"))
        };
        // No egraph pass: it moves pure operations down to their uses, which in long
        // straight runs of checked accesses keeps hundreds of values live at once and makes
        // register allocation take time that grows with the square of the program (2048
        // loads: 1.7 s against 23 ms). Compile time must stay linear: a user chooses the
        // program.
        set(&mut b, "opt_level", "none")?;
        // Cranelift's own IR checks in debug builds, where the tests run.
        set(
            &mut b,
            "enable_verifier",
            if cfg!(debug_assertions) {
                "true"
            } else {
                "false"
            },
        )?;
        // A function with many spills gets a large frame; probe it page by page.
        set(&mut b, "enable_probestack", "true")?;
        set(&mut b, "probestack_strategy", "inline")?;
        let flags = settings::Flags::new(b);
        cranelift_native::builder()
            .map_err(|e| format!("no Cranelift backend for this machine: {e}"))?
            .finish(flags)
            .map_err(|e| format!("Cranelift: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Compiled {
    /// Compiles the sanitized, bound instruction stream `insns`, whose memory instructions
    /// the verifier saw reach `targets`.
    pub(crate) fn new(
        insns: &[Insn],
        targets: &[Target],
        globals: &Globals,
    ) -> Result<Compiled, String> {
        let isa = isa()?;
        let call_conv = CallConv::triple_default(isa.triple());
        let mut sig = Signature::new(call_conv);
        sig.params.push(AbiParam::new(I64));
        sig.returns.push(AbiParam::new(I64));
        let mut func = Function::with_name_signature(UserFuncName::user(0, 0), sig);
        let plan = Plan {
            insns,
            targets,
            globals,
            trampolines: Trampolines {
                helper: call_helper,
                resolve,
                globals_bias: (globals.bytes().as_ptr() as u64).wrapping_sub(guest::GLOBALS),
            },
            call_conv,
            frontend: isa.frontend_config(),
        };
        translate(&plan, &mut func)?;
        let mut ctx = Context::for_function(func);
        let compiled = ctx
            .compile(isa.as_ref(), &mut ControlPlane::default())
            .map_err(|e| format!("Cranelift could not compile the program: {:?}", e.inner))?;
        let buffer = compiled.buffer.relocs();
        if let Some(FinalizedMachReloc { kind, .. }) = buffer.first() {
            return Err(format!("compiled code needs a relocation ({kind:?})"));
        }
        let code = Code::new(compiled.code_buffer()).map_err(|e| format!("code memory: {e}"))?;
        // SAFETY: the code starts with the function Cranelift compiled for this signature
        // and calling convention (the C convention of this target).
        let entry = unsafe {
            std::mem::transmute::<*const u8, unsafe extern "C" fn(*mut Vm) -> u64>(code.as_ptr())
        };
        Ok(Compiled { code, entry })
    }

    /// Bytes of machine code (page-rounded).
    pub(crate) fn code_size(&self) -> usize {
        self.code.len()
    }

    /// Runs one invocation over `arena` (already filled by the run loop).
    pub(crate) fn invoke(
        &self,
        arena: &mut Arena,
        globals: &Globals,
        run: &mut Run<'_>,
    ) -> Result<u64, RunError> {
        let fuel = run.grant();
        if fuel == 0 {
            run.charge(1);
        }
        if let Some(e) = run.take_stop() {
            return Err(e);
        }
        let arena_host = arena.host();
        let mut host = Host {
            run,
            // SAFETY: the arena is live for the call and, while compiled code or a helper
            // uses it, reached only through this raw pointer (the `&mut Arena` is not used
            // until the call returns).
            mem: unsafe { Memory::new(arena_host, globals.bytes(), Addressing::Guest) },
        };
        let mut vm = Vm {
            bias: (arena_host as u64).wrapping_sub(guest::CTX),
            fuel,
            r0: 0,
            pc: 0,
            addr: 0,
            access: 0,
            stop: 0,
            resume: 0,
            regs: [0; 10],
            host: (&raw mut host).cast(),
        };
        let vm_ptr = &raw mut vm;
        let status = loop {
            // SAFETY: `entry` is code compiled by `new` for exactly this signature. It reads
            // and writes only `vm`, the arena (each access checked against its areas) and
            // the globals (likewise, read-only), and calls the trampolines, which reach
            // `host` through `vm` for the duration of the call. It returns on every path.
            let status = unsafe { (self.entry)(vm_ptr) };
            // SAFETY: compiled code has returned; nothing else holds `vm` or `host`.
            let (vm, host) = unsafe { (&mut *vm_ptr, &mut *vm.host) };
            if status != Status::Yield as u64 {
                break status;
            }
            match host.run.refuel(vm.fuel) {
                Some(more) => vm.fuel = more,
                None => break Status::Stopped as u64,
            }
        };
        let run = host.run;
        let settled = run.settle(vm.fuel);
        let status = match status {
            s if s == Status::Exit as u64 => Status::Exit,
            s if s == Status::Access as u64 => Status::Access,
            s if s == Status::Unverified as u64 => Status::Unverified,
            _ => Status::Stopped,
        };
        match status {
            Status::Access => Err(RunError::Access {
                insn: Some(vm.pc as usize),
                addr: vm.addr,
                len: vm.access & 0xff,
                write: vm.access & 0x100 != 0,
            }),
            Status::Unverified => Err(RunError::Unverified {
                insn: vm.pc as usize,
            }),
            _ if !settled || run.stopped() => Err(run
                .take_stop()
                .unwrap_or_else(|| RunError::Fault("the engine stopped without a reason".into()))),
            Status::Stopped | Status::Yield => Err(RunError::Fault(
                "the engine stopped without a reason".into(),
            )),
            Status::Exit => Ok(vm.r0),
        }
    }
}

/// The host of the invocation `vm` belongs to.
///
/// # Safety
/// `vm` is the record `Compiled::invoke` passed to compiled code that is calling now.
unsafe fn host<'a>(vm: *mut Vm) -> &'a mut Host<'static, 'static> {
    // SAFETY: `invoke` set `host` to a `Host` that lives until compiled code returns, and
    // nothing else uses it while a trampoline runs.
    unsafe { &mut *(*vm).host }
}

/// Charges and calls a helper for compiled code.
extern "C" fn call_helper(
    vm: *mut Vm,
    helper: &'static Helper,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
) -> u64 {
    // SAFETY: called only by compiled code, with its own `vm`.
    let (vm, host) = unsafe { (&mut *vm, host(vm)) };
    let args = [a1, a2, a3, a4, a5];
    vm.fuel = vm
        .fuel
        .saturating_sub((helper.cost)(&args).min(i64::MAX as u64) as i64);
    if vm.fuel < 0 {
        match host.run.refuel(vm.fuel) {
            Some(f) => vm.fuel = f,
            None => {
                vm.fuel = 0;
                vm.stop = 1;
                return 0;
            }
        }
    }
    let r = helper.call(host.run, &mut host.mem, &args);
    if host.run.stopped() {
        vm.stop = 1;
    }
    r
}

/// The host address of `len` bytes at guest address `addr`, or 0 if the program may not
/// touch them (`write`: may not write them).
extern "C" fn resolve(vm: *mut Vm, addr: u64, len: u64, write: u64) -> u64 {
    // SAFETY: called only by compiled code, with its own `vm`.
    let (vm, host) = unsafe { (&mut *vm, host(vm)) };
    let next = guest::CTX + ctx::NEXT as u64;
    if write != 0 && addr == next && len == 8 {
        return vm.bias.wrapping_add(addr);
    }
    let p = if write != 0 {
        host.mem.write(addr, len).map(|s| s.as_mut_ptr() as u64)
    } else {
        host.mem.read(addr, len).map(|s| s.as_ptr() as u64)
    };
    p.unwrap_or(0)
}
