//! eBPF → Cranelift IR, with a check on every memory access and a meter on every block.
//!
//! The translated function takes one argument, the [`Vm`](super::checked::Vm) of the
//! invocation, and returns a status. Registers r0–r9 are Cranelift variables; r10 is the
//! constant top of the stack. Every instruction becomes code whose result RFC 9669 defines,
//! whatever its operands (division by zero gives zero, modulo by zero leaves the dividend,
//! shift amounts are masked), so nothing the program computes can trap.
//!
//! - **Memory.** Each load and store computes its guest address and checks it against the
//!   bounds of the area the verifier says it targets (one compare-and-branch); stores to
//!   the context may only write `ctx->next`. An access the verifier saw reach several areas,
//!   or none it could name, is resolved by a call into Rust that checks every area. A
//!   failed check leaves the function with the access's slot and address.
//! - **Fuel.** Each basic block subtracts its instruction count from a fuel variable.
//!   Blocks that a backward jump enters check it, and when it is spent the function yields:
//!   it saves the registers, returns, and is called again where it stopped once the run has
//!   granted more ([`Run::refuel`](crate::run::Run::refuel), which also checks the
//!   instruction limit and the clock). Helper calls are charged, and refuelled, by their
//!   trampoline. Every cycle passes a backward jump, so between two checks at most the
//!   program's length in instructions runs.
//! - **Unverified code.** A slot the verifier never reached holds a trap
//!   ([`crate::verify::sanitize`]); executing it leaves the function.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::immediates::Imm64;
use cranelift_codegen::ir::types::{I16, I32, I64};
use cranelift_codegen::ir::{
    AbiParam, Block, BlockArg, BlockCall, Endianness, Function, InstBuilder, JumpTableData,
    MemFlagsData, Signature, Type, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

use super::checked::{Status, Trampolines, vm};
use crate::abi::ctx;
use crate::helpers;
use crate::insn::{CALL_HELPER, Insn, SRC_X, alu, class, jmp, mem};
use crate::memory::{Area, Globals, guest};
use crate::verify::value::Region;
use crate::verify::{TRAP_HELPER, Target};

/// What the translator needs besides the instructions.
pub(super) struct Plan<'a> {
    /// The sanitized stream (unreached slots are traps), globals bound to guest addresses.
    pub insns: &'a [Insn],
    /// Per slot, what the verifier saw each memory instruction reach.
    pub targets: &'a [Target],
    pub globals: &'a Globals,
    pub trampolines: Trampolines,
    pub call_conv: CallConv,
    pub frontend: TargetFrontendConfig,
}

/// The bounds one access is checked against, and how its guest address becomes a host one.
enum Check {
    /// `[start, end)` in guest addresses; `arena` says whether the host address is the
    /// arena's bias plus the guest address, or the globals' bias plus it.
    Span { start: u64, end: u64, arena: bool },
    /// Resolved by a call into Rust that checks every area.
    Resolve,
    /// No access of this kind is allowed (a store to a read-only area).
    Never,
}

fn flags() -> MemFlagsData {
    // Every access is checked before it is made, so none can trap.
    MemFlagsData::new()
        .with_notrap()
        .with_endianness(Endianness::Little)
}

fn size_of(op: u8) -> u64 {
    match op & 0x18 {
        mem::B => 1,
        mem::H => 2,
        mem::W => 4,
        _ => 8,
    }
}

/// Whether slot `pc` holds a jump with a target in `off` (not call or exit).
fn is_jump(i: &Insn) -> bool {
    matches!(i.class(), class::JMP | class::JMP32) && !matches!(i.op & 0xf0, jmp::CALL | jmp::EXIT)
}

/// Target slot of the jump at `pc`, if it lies in the program.
fn jump_target(pc: usize, i: &Insn, n: usize) -> Option<usize> {
    let t = pc as i64 + 1 + i64::from(i.off);
    (0..n as i64).contains(&t).then_some(t as usize)
}

struct Translator<'a, 'f> {
    plan: &'a Plan<'a>,
    b: FunctionBuilder<'f>,
    regs: [Variable; 10],
    fuel: Variable,
    vm: Value,
    /// Host address of guest address 0, for arena areas (arena − `guest::CTX`).
    arena_bias: Value,
    /// Block starting at each slot that starts one.
    blocks: Vec<Option<Block>>,
    exit: Block,
    stopped: Block,
    /// Blocks still to fill with a trap for a slot.
    traps: Vec<(Block, usize)>,
    /// Where a yielded invocation resumes: `vm.resume` k resumes at `resumes[k - 1]`.
    resumes: Vec<Block>,
    /// Entered instead of the program's start when `vm.resume` is set.
    dispatch: Block,
    helper_sig: cranelift_codegen::ir::SigRef,
    resolve_sig: cranelift_codegen::ir::SigRef,
}

/// Most slots that backward jumps enter, and most jumps into one slot. Register
/// allocation's work grows with blocks times values, and each of these adds blocks that
/// keep every register live (a loop head's yield and resume) or values on every edge in:
/// a program chooses both, so both are bounded (see [`MAX_WORK`]).
pub(super) const MAX_LOOP_HEADS: usize = 4096;
pub(super) const MAX_JUMPS_IN: usize = 4096;
/// Most blocks times values of the translated function: a little above what the largest
/// program the verifier accepts needs (65,536 slots of checked loads, stores and branches,
/// 4·10^10), which compiles in about a second.
pub(super) const MAX_WORK: u64 = 6 * 10u64.pow(10);

/// Builds the function for `plan` into `func`; an error if it would cost more to compile
/// than the bounds above allow.
pub(super) fn translate(plan: &Plan<'_>, func: &mut Function) -> Result<(), String> {
    let n = plan.insns.len();

    // Leaders: the entry, jump targets, and slots after jumps and exits. Slots that a
    // backward jump enters check the fuel.
    let mut leader = vec![false; n];
    let mut loop_head = vec![false; n];
    let mut second = vec![false; n];
    let mut jumps_in = vec![0usize; n];
    let mut pc = 0;
    if n > 0 {
        leader[0] = true;
    }
    while pc < n {
        let i = &plan.insns[pc];
        if i.is_lddw() && pc + 1 < n {
            second[pc + 1] = true;
            pc += 2;
            continue;
        }
        if is_jump(i)
            && let Some(t) = jump_target(pc, i, n)
        {
            leader[t] = true;
            loop_head[t] |= t <= pc;
            jumps_in[t] += 1;
        }
        if (is_jump(i) || i.op == class::JMP | jmp::EXIT) && pc + 1 < n {
            leader[pc + 1] = true;
        }
        pc += 1;
    }
    let heads = loop_head.iter().filter(|&&h| h).count();
    if heads > MAX_LOOP_HEADS {
        return Err(format!(
            "{heads} instructions are entered by backward jumps (loop heads); a program may \
             have {MAX_LOOP_HEADS}"
        ));
    }
    if let Some(most) = jumps_in.iter().copied().max().filter(|&m| m > MAX_JUMPS_IN) {
        return Err(format!(
            "{most} jumps enter one instruction; a program may have {MAX_JUMPS_IN}"
        ));
    }
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(func, &mut fctx);
    let blocks: Vec<Option<Block>> = (0..n)
        .map(|pc| leader[pc].then(|| b.create_block()))
        .collect();

    let ptr = I64;
    let mut sig = |params: &[Type], ret: Type| {
        let mut s = Signature::new(plan.call_conv);
        s.params.extend(params.iter().map(|&t| AbiParam::new(t)));
        s.returns.push(AbiParam::new(ret));
        b.import_signature(s)
    };
    let helper_sig = sig(&[ptr, ptr, I64, I64, I64, I64, I64], I64);
    let resolve_sig = sig(&[ptr, I64, I64, I64], I64);

    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    let exit = b.create_block();
    b.append_block_param(exit, I64);
    let stopped = b.create_block();
    b.set_cold_block(stopped);

    b.switch_to_block(entry);
    let vm = b.block_params(entry)[0];
    let regs: [Variable; 10] = std::array::from_fn(|_| b.declare_var(I64));
    let fuel = b.declare_var(I64);
    let f = b.ins().load(I64, flags(), vm, vm::FUEL);
    b.def_var(fuel, f);
    let arena_bias = b.ins().load(I64, flags(), vm, vm::BIAS);
    let resume = b.ins().load(I64, flags(), vm, vm::RESUME);
    let dispatch = b.create_block();
    b.set_cold_block(dispatch);
    let start = b.create_block();
    b.ins().brif(resume, dispatch, &[], start, &[]);
    b.seal_block(start);
    b.seal_block(dispatch);
    b.switch_to_block(start);
    let zero = b.ins().iconst(I64, 0);
    for (r, v) in regs.iter().enumerate() {
        let init = if r == 1 {
            b.ins().iconst(I64, guest::CTX as i64)
        } else {
            zero
        };
        b.def_var(*v, init);
    }

    let mut t = Translator {
        plan,
        b,
        regs,
        fuel,
        vm,
        arena_bias,
        blocks,
        exit,
        stopped,
        traps: Vec::new(),
        resumes: Vec::new(),
        dispatch,
        helper_sig,
        resolve_sig,
    };
    match t.blocks.first().copied().flatten() {
        Some(first) => {
            t.b.ins().jump(first, &[]);
        }
        None => t.trap(0),
    }
    t.body(&leader, &loop_head, &second);
    t.epilogues();
    t.b.seal_all_blocks();
    t.b.finalize(plan.frontend);
    let work = func.dfg.num_blocks() as u64 * func.dfg.num_values() as u64;
    if work > MAX_WORK {
        return Err(format!(
            "too costly to compile: {} blocks × {} values once translated, \
             above {MAX_WORK}; split it or make it shorter",
            func.dfg.num_blocks(),
            func.dfg.num_values()
        ));
    }
    Ok(())
}

impl Translator<'_, '_> {
    fn reg(&mut self, r: u8) -> Value {
        match r {
            0..=9 => self.b.use_var(self.regs[r as usize]),
            _ => self.b.ins().iconst(I64, guest::STACK_TOP as i64),
        }
    }

    fn set(&mut self, r: u8, v: Value) {
        self.b.def_var(self.regs[r as usize], v);
    }

    fn konst(&mut self, v: u64) -> Value {
        self.b.ins().iconst(I64, Imm64::new(v as i64))
    }

    /// Leaves with status `Unverified`: slot `pc` was never reached by the verifier.
    fn trap(&mut self, pc: usize) {
        let at = self.konst(pc as u64);
        self.b.ins().store(flags(), at, self.vm, vm::PC);
        self.leave(Status::Unverified);
    }

    /// Leaves with status `Access`: `size` bytes at guest address `addr` (`write`: written)
    /// are outside what the instruction at `pc` may touch.
    fn fault(&mut self, pc: usize, addr: Value, size: u64, write: bool) {
        let at = self.konst(pc as u64);
        let code = self.konst(size | u64::from(write) << 8);
        self.b.ins().store(flags(), at, self.vm, vm::PC);
        self.b.ins().store(flags(), addr, self.vm, vm::ADDR);
        self.b.ins().store(flags(), code, self.vm, vm::ACCESS);
        self.leave(Status::Access);
    }

    fn leave(&mut self, status: Status) {
        let s = self.konst(status as u64);
        self.b.ins().return_(&[s]);
    }

    /// Continues in a new block if `ok`, else faults (in a cold block, so that nothing of
    /// the fault path is computed on the way through).
    fn check_or_fault(&mut self, ok: Value, pc: usize, addr: Value, size: u64, write: bool) {
        let go = self.b.create_block();
        let bad = self.b.create_block();
        self.b.set_cold_block(bad);
        self.b.ins().brif(ok, go, &[], bad, &[]);
        self.b.seal_block(bad);
        self.b.seal_block(go);
        self.b.switch_to_block(bad);
        self.fault(pc, addr, size, write);
        self.b.switch_to_block(go);
    }

    /// The block a jump to slot `t` enters, or a trap if `t` starts none.
    fn target(&mut self, from: usize, t: Option<usize>) -> Block {
        if let Some(b) = t.and_then(|t| self.blocks[t]) {
            return b;
        }
        let b = self.b.create_block();
        self.b.set_cold_block(b);
        self.traps.push((b, from));
        b
    }

    fn body(&mut self, leader: &[bool], loop_head: &[bool], second: &[bool]) {
        let n = self.plan.insns.len();
        // The entry block has jumped to slot 0's block already.
        let mut open = false;
        let mut pc = 0;
        while pc < n {
            if leader[pc] && !second[pc] {
                let block = self.blocks[pc].expect("a leader has a block");
                if open {
                    self.b.ins().jump(block, &[]);
                }
                // Every jump into this block is translated by now, unless a later slot
                // jumps back to it. Sealing early keeps SSA construction linear.
                if !loop_head[pc] {
                    self.b.seal_block(block);
                }
                self.b.switch_to_block(block);
                open = true;
                self.meter(pc, leader, loop_head[pc]);
            }
            if !open {
                // Code after a jump or exit that no jump enters: never runs.
                pc += 1;
                continue;
            }
            let i = self.plan.insns[pc];
            let width = if i.is_lddw() && pc + 1 < n { 2 } else { 1 };
            open = self.insn(pc, &i);
            pc += width;
        }
        if open {
            // Execution would run off the end.
            self.trap(n);
        }
        // Jumps into the second slot of an lddw land on a trap, as do jumps out.
        for (pc, block) in self.blocks.iter().enumerate() {
            if let (true, Some(block)) = (second[pc], block) {
                self.traps.push((*block, pc));
            }
        }
        for (block, pc) in std::mem::take(&mut self.traps) {
            self.b.switch_to_block(block);
            self.trap(pc);
        }
    }

    /// Charges the block starting at `pc` and, at a loop head, checks the fuel.
    fn meter(&mut self, pc: usize, leader: &[bool], check: bool) {
        let insns = self.plan.insns;
        let (mut len, mut at) = (0i64, pc);
        loop {
            len += 1;
            at += if insns[at].is_lddw() { 2 } else { 1 };
            if at >= insns.len() || leader[at] {
                break;
            }
        }
        let fuel = self.b.use_var(self.fuel);
        let fuel = self.b.ins().iadd_imm_s(fuel, -len);
        self.b.def_var(self.fuel, fuel);
        if check {
            self.check_fuel();
        }
    }

    /// If the fuel is spent, yields: saves the registers, says where to resume, and returns
    /// to the run, which grants more fuel (or stops the run) and calls back in. A call
    /// instead would make every value live across the loop's back edge survive a call, and
    /// the loop would spill.
    fn check_fuel(&mut self) {
        let fuel = self.b.use_var(self.fuel);
        let spent = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, fuel, 0);
        let pause = self.b.create_block();
        let go = self.b.create_block();
        self.b.set_cold_block(pause);
        self.b.ins().brif(spent, pause, &[], go, &[]);
        self.b.seal_block(pause);
        self.b.switch_to_block(pause);
        for r in 0..10u8 {
            let v = self.reg(r);
            self.b
                .ins()
                .store(flags(), v, self.vm, vm::REGS + 8 * i32::from(r));
        }
        self.resumes.push(go);
        let at = self.konst(self.resumes.len() as u64);
        self.b.ins().store(flags(), at, self.vm, vm::RESUME);
        let fuel = self.b.use_var(self.fuel);
        self.b.ins().store(flags(), fuel, self.vm, vm::FUEL);
        self.leave(Status::Yield);
        self.b.switch_to_block(go);
    }

    /// Translates one instruction; `false` if it ends its block (jump, exit).
    fn insn(&mut self, pc: usize, i: &Insn) -> bool {
        if i.dst > 10 || i.src > 10 {
            self.trap(pc);
            return false;
        }
        match i.class() {
            class::ALU | class::ALU64 => self.alu(pc, i),
            class::LD => self.lddw(pc, i),
            class::LDX => self.load(pc, i),
            class::ST | class::STX => self.store(pc, i),
            _ => self.jump(pc, i),
        }
    }

    fn alu(&mut self, pc: usize, i: &Insn) -> bool {
        let code = i.op & 0xf0;
        let is64 = i.class() == class::ALU64;
        if i.dst == 10 || i.off != 0 && code != alu::END || is64 && code == alu::END {
            // r10 is read-only; v4 forms (sdiv, smod, movsx, bswap) are not run.
            self.trap(pc);
            return false;
        }
        let d = self.reg(i.dst);
        if code == alu::END {
            let v = match (i.imm, i.op & SRC_X != 0) {
                (16, false) => self.b.ins().band_imm_u(d, 0xffff),
                (32, false) => self.low32(d),
                (64, false) => d,
                (16, true) => self.swap(d, I16),
                (32, true) => self.swap(d, I32),
                (64, true) => self.b.ins().bswap(d),
                _ => {
                    self.trap(pc);
                    return false;
                }
            };
            self.set(i.dst, v);
            return true;
        }
        let s = if i.op & SRC_X != 0 {
            self.reg(i.src)
        } else {
            // 64-bit operations sign-extend the immediate; 32-bit ones use its low half.
            self.konst(i64::from(i.imm) as u64)
        };
        let v = if is64 {
            match self.op(pc, code, d, s) {
                Some(v) => v,
                None => return false,
            }
        } else {
            let d32 = self.b.ins().ireduce(I32, d);
            let s32 = self.b.ins().ireduce(I32, s);
            let Some(v) = self.op(pc, code, d32, s32) else {
                return false;
            };
            self.b.ins().uextend(I64, v)
        };
        self.set(i.dst, v);
        true
    }

    fn low32(&mut self, v: Value) -> Value {
        let v = self.b.ins().ireduce(I32, v);
        self.b.ins().uextend(I64, v)
    }

    fn swap(&mut self, v: Value, ty: Type) -> Value {
        let v = self.b.ins().ireduce(ty, v);
        let v = self.b.ins().bswap(v);
        self.b.ins().uextend(I64, v)
    }

    /// `d op s` at the operands' width; `None` (and a trap) for an unknown operation.
    fn op(&mut self, pc: usize, code: u8, d: Value, s: Value) -> Option<Value> {
        let ins = self.b.ins();
        Some(match code {
            alu::ADD => ins.iadd(d, s),
            alu::SUB => ins.isub(d, s),
            alu::MUL => ins.imul(d, s),
            alu::OR => ins.bor(d, s),
            alu::AND => ins.band(d, s),
            alu::XOR => ins.bxor(d, s),
            // Cranelift masks shift amounts by the width, as eBPF does.
            alu::LSH => ins.ishl(d, s),
            alu::RSH => ins.ushr(d, s),
            alu::ARSH => ins.sshr(d, s),
            alu::NEG => ins.ineg(d),
            alu::MOV => s,
            alu::DIV | alu::MOD => {
                // The divisor is never zero when divided by: d / 0 = 0 and d % 0 = d.
                let zero = self.b.ins().icmp_imm_s(IntCC::Equal, s, 0);
                let ty = self.b.func.dfg.value_type(s);
                let one = self.b.ins().iconst(ty, 1);
                let safe = self.b.ins().select(zero, one, s);
                if code == alu::DIV {
                    let q = self.b.ins().udiv(d, safe);
                    let nothing = self.b.ins().iconst(ty, 0);
                    self.b.ins().select(zero, nothing, q)
                } else {
                    let r = self.b.ins().urem(d, safe);
                    self.b.ins().select(zero, d, r)
                }
            }
            _ => {
                self.trap(pc);
                return None;
            }
        })
    }

    fn lddw(&mut self, pc: usize, i: &Insn) -> bool {
        let Some(hi) = self
            .plan
            .insns
            .get(pc + 1)
            .filter(|_| i.is_lddw() && i.src == 0)
        else {
            self.trap(pc);
            return false;
        };
        if i.dst == 10 {
            self.trap(pc);
            return false;
        }
        let v = u64::from(hi.imm as u32) << 32 | u64::from(i.imm as u32);
        let v = self.konst(v);
        self.set(i.dst, v);
        true
    }

    /// What an access by the instruction at `pc` is checked against.
    fn check(&self, pc: usize, write: bool) -> Check {
        let span = |area: Area| {
            let s = area.span();
            Check::Span {
                start: s.start,
                end: s.end,
                arena: true,
            }
        };
        match self
            .plan
            .targets
            .get(pc)
            .copied()
            .unwrap_or(Target::Unreached)
        {
            Target::One(region) => match (region, write) {
                (Region::Ctx, false) => span(Area::Ctx),
                (Region::Ctx, true) => {
                    let next = guest::CTX + ctx::NEXT as u64;
                    Check::Span {
                        start: next,
                        end: next + 8,
                        arena: true,
                    }
                }
                (Region::Data, false) => span(Area::Window),
                (Region::Arg, false) => span(Area::Arg),
                (Region::Scratch, _) => span(Area::Scratch),
                (Region::Stack, _) => span(Area::Stack),
                (Region::Global(g), false) => match self.plan.globals.span(g.index()) {
                    Some(s) => Check::Span {
                        start: s.start,
                        end: s.end,
                        arena: false,
                    },
                    None => Check::Never,
                },
                _ => Check::Never,
            },
            Target::Many | Target::Unreached => Check::Resolve,
        }
    }

    /// The host address of `size` bytes at `r + off`, after checking them; `None` if the
    /// access faults for certain (the block is then closed).
    fn address(&mut self, pc: usize, r: u8, off: i16, size: u64, write: bool) -> Option<Value> {
        let base = self.reg(r);
        let addr = self.b.ins().iadd_imm_s(base, i64::from(off));
        match self.check(pc, write) {
            Check::Span { start, end, arena } if end - start >= size => {
                // addr − start ≤ (end − start − size), unsigned: one compare covers both ends
                // and every wrap.
                let rel = self.b.ins().iadd_imm_s(addr, -(start as i64));
                let ok = self.b.ins().icmp_imm_u(
                    IntCC::UnsignedLessThanOrEqual,
                    rel,
                    (end - start - size) as i64,
                );
                self.check_or_fault(ok, pc, addr, size, write);
                let bias = if arena {
                    self.arena_bias
                } else {
                    self.konst(self.plan.trampolines.globals_bias)
                };
                // Past the branch `ok` holds, but a CPU may get here speculatively before
                // it knows: a conditional move (not a branch) keeps even that access inside
                // the area.
                let first = self.konst(start);
                let addr = self.b.ins().select(ok, addr, first);
                Some(self.b.ins().iadd(bias, addr))
            }
            Check::Resolve => {
                let f = self.konst(self.plan.trampolines.resolve as usize as u64);
                let len = self.konst(size);
                let w = self.konst(u64::from(write));
                let call =
                    self.b
                        .ins()
                        .call_indirect(self.resolve_sig, f, &[self.vm, addr, len, w]);
                let host = self.b.inst_results(call)[0];
                self.check_or_fault(host, pc, addr, size, write);
                Some(host)
            }
            Check::Span { .. } | Check::Never => {
                self.fault(pc, addr, size, write);
                None
            }
        }
    }

    fn load(&mut self, pc: usize, i: &Insn) -> bool {
        if i.op & 0xe0 != mem::MEM || i.dst == 10 {
            self.trap(pc);
            return false;
        }
        let size = size_of(i.op);
        let Some(host) = self.address(pc, i.src, i.off, size, false) else {
            return false;
        };
        let ins = self.b.ins();
        let v = match size {
            1 => ins.uload8(I64, flags(), host, 0),
            2 => ins.uload16(I64, flags(), host, 0),
            4 => ins.uload32(flags(), host, 0),
            _ => ins.load(I64, flags(), host, 0),
        };
        self.set(i.dst, v);
        true
    }

    fn store(&mut self, pc: usize, i: &Insn) -> bool {
        if i.op & 0xe0 != mem::MEM {
            // Atomics and the rest are not run.
            self.trap(pc);
            return false;
        }
        let size = size_of(i.op);
        let v = if i.class() == class::STX {
            self.reg(i.src)
        } else {
            self.konst(i64::from(i.imm) as u64)
        };
        let Some(host) = self.address(pc, i.dst, i.off, size, true) else {
            return false;
        };
        let ins = self.b.ins();
        match size {
            1 => ins.istore8(flags(), v, host, 0),
            2 => ins.istore16(flags(), v, host, 0),
            4 => ins.istore32(flags(), v, host, 0),
            _ => ins.store(flags(), v, host, 0),
        };
        true
    }

    fn jump(&mut self, pc: usize, i: &Insn) -> bool {
        let n = self.plan.insns.len();
        let code = i.op & 0xf0;
        let is32 = i.class() == class::JMP32;
        match code {
            jmp::EXIT if !is32 => {
                let r0 = self.reg(0);
                self.b.ins().jump(self.exit, &[BlockArg::Value(r0)]);
                return false;
            }
            jmp::CALL if !is32 && i.src == CALL_HELPER => return self.call(pc, i.imm),
            jmp::JA if !is32 => {
                let to = self.target(pc, jump_target(pc, i, n));
                self.b.ins().jump(to, &[]);
                return false;
            }
            jmp::CALL | jmp::EXIT | jmp::JA | 0xe0 | 0xf0 => {
                self.trap(pc);
                return false;
            }
            _ => {}
        }
        let mut a = self.reg(i.dst);
        let mut b = if i.op & SRC_X != 0 {
            self.reg(i.src)
        } else {
            self.konst(i64::from(i.imm) as u64)
        };
        if is32 {
            a = self.b.ins().ireduce(I32, a);
            b = self.b.ins().ireduce(I32, b);
        }
        let cond = match code {
            jmp::JSET => {
                let both = self.b.ins().band(a, b);
                self.b.ins().icmp_imm_s(IntCC::NotEqual, both, 0)
            }
            _ => {
                let cc = match code {
                    jmp::JEQ => IntCC::Equal,
                    jmp::JNE => IntCC::NotEqual,
                    jmp::JGT => IntCC::UnsignedGreaterThan,
                    jmp::JGE => IntCC::UnsignedGreaterThanOrEqual,
                    jmp::JLT => IntCC::UnsignedLessThan,
                    jmp::JLE => IntCC::UnsignedLessThanOrEqual,
                    jmp::JSGT => IntCC::SignedGreaterThan,
                    jmp::JSGE => IntCC::SignedGreaterThanOrEqual,
                    jmp::JSLT => IntCC::SignedLessThan,
                    _ => IntCC::SignedLessThanOrEqual,
                };
                self.b.ins().icmp(cc, a, b)
            }
        };
        let taken = self.target(pc, jump_target(pc, i, n));
        let next = self.target(pc, (pc + 1 < n).then_some(pc + 1));
        self.b.ins().brif(cond, taken, &[], next, &[]);
        false
    }

    /// A helper call: the trampoline charges it, runs it and says whether the run goes on.
    fn call(&mut self, pc: usize, id: i32) -> bool {
        let Some(helper) = helpers::by_id(id).filter(|_| id != TRAP_HELPER) else {
            self.trap(pc);
            return false;
        };
        let fuel = self.b.use_var(self.fuel);
        self.b.ins().store(flags(), fuel, self.vm, vm::FUEL);
        let at = self.konst(pc as u64);
        self.b.ins().store(flags(), at, self.vm, vm::PC);
        let f = self.konst(self.plan.trampolines.helper as usize as u64);
        let h = self.konst(helper as *const helpers::Helper as u64);
        let mut args = vec![self.vm, h];
        for r in 1..=5 {
            args.push(self.reg(r));
        }
        let call = self.b.ins().call_indirect(self.helper_sig, f, &args);
        let r0 = self.b.inst_results(call)[0];
        self.set(0, r0);
        let fuel = self.b.ins().load(I64, flags(), self.vm, vm::FUEL);
        self.b.def_var(self.fuel, fuel);
        let stop = self.b.ins().load(I64, flags(), self.vm, vm::STOP);
        let go = self.b.create_block();
        self.b.ins().brif(stop, self.stopped, &[], go, &[]);
        self.b.seal_block(go);
        self.b.switch_to_block(go);
        true
    }

    /// The shared ways out: the normal exit saves r0 and the fuel left; a stop needs
    /// neither (the run fails, and its reason is recorded already).
    fn epilogues(&mut self) {
        self.b.switch_to_block(self.exit);
        let r0 = self.b.block_params(self.exit)[0];
        self.b.ins().store(flags(), r0, self.vm, vm::R0);
        let fuel = self.b.use_var(self.fuel);
        self.b.ins().store(flags(), fuel, self.vm, vm::FUEL);
        self.leave(Status::Exit);

        self.b.switch_to_block(self.stopped);
        self.leave(Status::Stopped);

        // Resuming: the registers as the yield saved them, then on where it stopped.
        self.b.switch_to_block(self.dispatch);
        let resume = self.b.ins().load(I64, flags(), self.vm, vm::RESUME);
        let index = self.b.ins().iadd_imm_s(resume, -1);
        // Only compiled code writes `resume` (a yield's own number), so it fits.
        let index = self.b.ins().ireduce(I32, index);
        let mut table = Vec::with_capacity(self.resumes.len());
        let mut loads = Vec::with_capacity(self.resumes.len());
        for _ in 0..self.resumes.len() {
            loads.push(self.b.create_block());
        }
        let bad = self.b.create_block();
        let pool = &mut self.b.func.dfg.value_lists;
        for &l in &loads {
            table.push(BlockCall::new(l, [], pool));
        }
        let default = BlockCall::new(bad, [], pool);
        let jt = self
            .b
            .create_jump_table(JumpTableData::new(default, &table));
        self.b.ins().br_table(index, jt);
        for (k, &l) in loads.iter().enumerate() {
            self.b.switch_to_block(l);
            for r in 0..10u8 {
                let v = self
                    .b
                    .ins()
                    .load(I64, flags(), self.vm, vm::REGS + 8 * i32::from(r));
                self.b.def_var(self.regs[r as usize], v);
            }
            self.b.ins().jump(self.resumes[k], &[]);
        }
        self.b.switch_to_block(bad);
        self.leave(Status::Stopped);
    }
}
