//! The verifier: proves, before a program runs, that every execution is memory-safe, reads
//! nothing uninitialised, leaks no pointer, calls helpers as their prototypes say, and ends
//! within a number of instructions it computes.
//!
//! It explores the program path by path, as the Linux verifier does, with abstract values
//! ([`value`]) in place of numbers, so that a loop is followed iteration by iteration while
//! its counter stays known. At every jump target the state reached is compared with the
//! states already seen there: if one of them covers it, the path is pruned, because
//! everything that can happen from here was already shown safe. If the covering state is
//! one this very path passed through, the program can loop forever without the verifier
//! seeing a bound, and it is rejected. Exploration is bounded in instructions, states and
//! time, so the verifier itself ends on any input.
//!
//! Every explored state knows the longest path from it to an `exit`, so the verifier also
//! returns the most instructions one invocation can execute (`Verified::max_insns`); the
//! runtime charges that bound against the run's instruction budget.

mod dataflow;
pub mod value;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::abi::{self, Arg, STACK_SIZE, ctx};
use crate::elf::DataRef;
use crate::insn::{self, CALL_HELPER, Insn, SRC_X, Unsupported, alu, class, jmp, mem};
use value::{Link, Range, Region, Slot, Thresholds, Value, alu_range};

/// Bounds on the verifier's own work.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Instructions processed over all paths.
    pub insns: u64,
    /// States kept for pruning.
    pub states: usize,
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            insns: 1_000_000,
            states: 100_000,
            time: Duration::from_secs(2),
        }
    }
}

/// What the verifier learnt about an accepted program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Most instructions one invocation can execute.
    pub max_insns: u64,
    /// Instructions the verifier processed.
    pub processed: u64,
    /// States it kept.
    pub states: usize,
    /// Bytes of stack the program uses.
    pub stack: usize,
}

/// Why a program was rejected, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Slot of the offending instruction.
    pub insn: usize,
    pub reason: Reason,
}

/// Why a program was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    Unsupported(Unsupported),
    /// More instruction slots than `elf::MAX_INSNS`.
    TooLarge {
        insns: usize,
    },
    BadRegister(u8),
    FramePointerWrite,
    JumpOutside,
    JumpIntoLddw,
    FallsOffEnd,
    LocalCall,
    Uninit {
        reg: u8,
    },
    UninitStack {
        off: i64,
        size: i64,
    },
    NotPointer {
        reg: u8,
    },
    OutOfBounds {
        region: Region,
        lo: i64,
        hi: i64,
        size: i64,
    },
    ReadOnly {
        region: Region,
    },
    CtxField {
        off: i64,
        size: i64,
    },
    PointerLeak(&'static str),
    PointerArithmetic(&'static str),
    PointerCompare,
    SpilledPointer,
    DivByZero,
    UnknownHelper(i32),
    HelperArg {
        helper: &'static str,
        arg: usize,
        why: &'static str,
    },
    ReturnsPointer,
    /// The path came back to `insn` in a state it had been in: nothing bounds the loop.
    Loop,
    /// Exploration exceeded its budget; `insn` is the jump target visited most often.
    TooComplex {
        processed: u64,
    },
    Timeout,
}

fn region_name(r: &Region) -> String {
    match r {
        Region::Ctx => "the context".into(),
        Region::Data => "the data window".into(),
        Region::Stack => "the stack".into(),
        Region::Scratch => "scratch memory".into(),
        Region::Arg => "the argument blob".into(),
        Region::Global(i) => format!("global section {i}"),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Unsupported(u) => write!(f, "{u}"),
            Reason::TooLarge { insns } => write!(
                f,
                "{insns} instructions; the limit is {}",
                crate::elf::MAX_INSNS
            ),
            Reason::BadRegister(r) => write!(f, "there is no register r{r}"),
            Reason::FramePointerWrite => write!(f, "r10, the frame pointer, is read-only"),
            Reason::JumpOutside => write!(f, "jump target outside the program"),
            Reason::JumpIntoLddw => write!(f, "jump into the middle of an lddw"),
            Reason::FallsOffEnd => write!(f, "execution can run past the last instruction"),
            Reason::LocalCall => write!(f, "bpf-to-bpf call left after inlining"),
            Reason::Uninit { reg } => write!(f, "r{reg} is read before it is written"),
            Reason::UninitStack { off, size } => write!(
                f,
                "reads {size} bytes of stack at r10{off:+} that were not all written"
            ),
            Reason::NotPointer { reg } => {
                write!(
                    f,
                    "r{reg} holds a number, not a pointer: it cannot be dereferenced"
                )
            }
            Reason::OutOfBounds {
                region,
                lo,
                hi,
                size,
            } => write!(
                f,
                "access to bytes [{lo}, {hi}) of {}, which has {size}; compare the offset with \
                 the end first (e.g. if (p + n > data_end) return 0;)",
                region_name(region)
            ),
            Reason::ReadOnly { region } => write!(f, "{} is read-only", region_name(region)),
            Reason::CtxField { off, size } => write!(
                f,
                "{size}-byte access at offset {off} of the context is not a permitted field access \
                 (fields are read whole, at a constant offset; only ctx->next is writable)"
            ),
            Reason::PointerLeak(what) => write!(f, "pointer leak: {what}"),
            Reason::PointerArithmetic(what) => write!(f, "pointer arithmetic: {what}"),
            Reason::PointerCompare => write!(
                f,
                "pointers may be compared only with pointers into the same region"
            ),
            Reason::SpilledPointer => {
                write!(
                    f,
                    "part of a pointer saved on the stack is overwritten or read"
                )
            }
            Reason::DivByZero => write!(
                f,
                "the divisor may be zero; check it first (if (d == 0) ...)"
            ),
            Reason::UnknownHelper(id) => write!(f, "unknown helper {id} (see nearfs.h)"),
            Reason::HelperArg { helper, arg, why } => {
                write!(f, "argument {arg} of {helper}: {why}")
            }
            Reason::ReturnsPointer => write!(f, "pointer leak: r0 holds a pointer at exit"),
            Reason::Loop => write!(
                f,
                "loop without a bound the verifier can see: the program can come back here in a \
                 state it was already in. Give the loop a constant bound, e.g. \
                 for (int i = 0; i < 64 && cond; i++)"
            ),
            Reason::TooComplex { processed } => write!(
                f,
                "the verifier gave up after {processed} instructions, most of them in the loop \
                 starting here; give it a smaller constant bound or move the work into a helper"
            ),
            Reason::Timeout => write!(f, "the verifier ran out of time"),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "insn {}: {}", self.insn, self.reason)
    }
}

impl std::error::Error for Rejection {}

/// What the verifier needs to know about the program's globals: sizes of the read-only
/// sections, by region index.
pub struct Globals<'a> {
    pub sizes: &'a [usize],
}

const SLOTS: usize = STACK_SIZE / 8;

/// The multiply-rotate hash of rustc's FxHasher: states are hashed constantly and never
/// by an adversary who could choose collisions to any effect but slowness, so SipHash's
/// protection buys nothing here.
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
const FP: usize = 10;

/// The abstract machine state on one path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    regs: [Value; 11],
    /// How registers relate to each other (see [`Link`]).
    links: [Link; 11],
    /// Stack slots from the top (index 0 is r10-8..r10); missing slots are empty.
    stack: Vec<Slot>,
}

impl State {
    fn slot(&self, k: usize) -> Slot {
        self.stack.get(k).copied().unwrap_or(Slot::EMPTY)
    }

    fn set_slot(&mut self, k: usize, s: Slot) {
        if self.stack.len() <= k {
            self.stack.resize(k + 1, Slot::EMPTY);
        }
        self.stack[k] = s;
    }

    /// Slot index and byte within it of stack region offset `o` (0..512).
    fn locate(o: i64) -> (usize, usize) {
        let o = o as usize;
        (SLOTS - 1 - o / 8, o % 8)
    }

    fn set(&mut self, r: u8, v: Value) {
        self.regs[r as usize] = v;
        self.links[r as usize] = Link::NONE;
    }

    /// Narrows register `r` to `v`, and every register and slot linked to it likewise;
    /// `false` if that leaves one of them no value (the path is impossible).
    fn narrow(&mut self, r: u8, v: Value) -> bool {
        let link = self.links[r as usize];
        let Some(v) = self.regs[r as usize].meet(&v) else {
            return false;
        };
        self.regs[r as usize] = v;
        if link.id == 0 {
            return true;
        }
        let moved =
            |other: &Link, old: &Value| old.meet(&v.shifted(other.delta.wrapping_sub(link.delta)));
        for k in 0..FP {
            if k != r as usize && self.links[k].id == link.id {
                match moved(&self.links[k], &self.regs[k]) {
                    Some(n) => self.regs[k] = n,
                    None => return false,
                }
            }
        }
        for slot in &mut self.stack {
            if let Slot::Spill(w, l) = slot
                && l.id == link.id
            {
                match moved(l, w) {
                    Some(n) => *w = n,
                    None => return false,
                }
            }
        }
        true
    }

    /// Whether the two states have the same links and stack layout, and registers and
    /// slots pairwise alike by `value` and `slot`.
    fn alike(
        &self,
        other: &State,
        value: impl Fn(&Value, &Value) -> bool,
        slot: impl Fn(&Slot, &Slot) -> bool,
    ) -> bool {
        self.links == other.links
            && self.stack.len() == other.stack.len()
            && self.regs.iter().zip(&other.regs).all(|(a, b)| value(a, b))
            && self.stack.iter().zip(&other.stack).all(|(a, b)| slot(a, b))
    }

    /// Same constants everywhere; ranges may differ.
    fn same_shape(&self, other: &State) -> bool {
        self.alike(other, Value::same_shape, Slot::same_shape)
    }

    /// As `same_shape`, but constants may differ too.
    fn same_kinds(&self, other: &State) -> bool {
        self.alike(other, Value::same_kind, Slot::same_kind)
    }

    /// A hash equal for states of the same shape (`same_shape`).
    fn shape_hash(&self) -> u64 {
        let mut h = FastHasher::default();
        self.links.hash(&mut h);
        let shape = |v: &Value| match v {
            Value::Uninit => (0u8, None),
            Value::Scalar(r) => (1, r.constant()),
            Value::Ptr { off, .. } => (2, off.constant()),
        };
        for v in &self.regs {
            shape(v).hash(&mut h);
        }
        for s in &self.stack {
            match s {
                Slot::Bytes(m) => (3u8, u64::from(*m), Link::NONE).hash(&mut h),
                Slot::Spill(v, l) => (shape(v), l).hash(&mut h),
            }
        }
        h.finish()
    }

    fn join(&self, other: &State, t: Option<&Thresholds>) -> State {
        let mut out = self.clone();
        for (r, v) in out.regs.iter_mut().zip(&other.regs) {
            *r = r.join(v, t);
        }
        for (s, o) in out.stack.iter_mut().zip(&other.stack) {
            if let (Slot::Spill(a, _), Slot::Spill(b, _)) = (s, o) {
                *a = a.join(b, t);
            }
        }
        out
    }

    fn covers(&self, other: &State) -> bool {
        // Canonical ids: a relation `self` relied on must hold in `other` too.
        self.links
            .iter()
            .zip(&other.links)
            .all(|(a, b)| a.implied_by(b))
            && self.regs.iter().zip(&other.regs).all(|(a, b)| a.covers(b))
            && (0..self.stack.len().max(other.stack.len()))
                .all(|k| self.slot(k).covers(&other.slot(k)))
    }

    /// Forgets what cannot matter from here on: registers that are not live become
    /// uninitialised, and numbers that will never reach an address, a length, a divisor
    /// or a branch become any number. Both only widen the state, so this is sound, and
    /// states that differed only there now prune each other.
    fn canonical(&mut self, live: u16, demanded: u16) {
        for r in 0..FP {
            if live & 1 << r == 0 {
                self.regs[r] = Value::Uninit;
                self.links[r] = Link::NONE;
            } else if demanded & 1 << r == 0 && matches!(self.regs[r], Value::Scalar(_)) {
                self.regs[r] = Value::Scalar(Range::UNKNOWN);
                self.links[r] = Link::NONE;
            }
        }
        // Number ids by first appearance; an id on one register says nothing.
        let slot_ids = self.stack.iter().filter_map(|s| match s {
            Slot::Spill(_, l) => Some(l.id),
            Slot::Bytes(_) => None,
        });
        let mut map: Vec<(u32, u32, usize)> = Vec::new();
        for id in self.links[..FP].iter().map(|l| l.id).chain(slot_ids) {
            if id == 0 {
                continue;
            }
            match map.iter_mut().find(|(old, _, _)| *old == id) {
                Some(e) => e.2 += 1,
                None => map.push((id, map.len() as u32 + 1, 1)),
            }
        }
        let renumber = |link: &mut Link| {
            if let Some(&(_, new, n)) = map.iter().find(|(old, _, _)| *old == link.id) {
                *link = if n > 1 {
                    Link { id: new, ..*link }
                } else {
                    Link::NONE
                };
            }
        };
        for r in 0..FP {
            renumber(&mut self.links[r]);
        }
        for slot in &mut self.stack {
            if let Slot::Spill(_, l) = slot {
                renumber(l);
            }
        }
        while self.stack.last() == Some(&Slot::EMPTY) {
            self.stack.pop();
        }
    }

    fn hash64(&self) -> u64 {
        let mut h = FastHasher::default();
        self.hash(&mut h);
        h.finish()
    }
}

/// Where a conditional jump may go.
enum Flow {
    Next(usize),
    Jump(usize),
    Branch(Vec<(State, usize)>),
    Exit,
}

/// A state at a jump target and the paths that reach it. Nodes form a DAG: a node
/// reached by several paths (merged, or pruned into before it finished) has several
/// parents.
struct Node {
    /// (parent, instructions from the parent's start to this node).
    parents: Vec<(u32, u64)>,
    pc: usize,
    /// Back-edges taken on the way here: a loop iteration count.
    iter: u32,
    /// Children and prunes into unfinished nodes this node waits for.
    pending: u32,
    walked: bool,
    done: bool,
    /// Longest path from here to an exit.
    cost: u64,
}

/// Verifies a program without local calls (see [`crate::inline`]).
pub fn verify(
    insns: &[Insn],
    refs: &[DataRef],
    globals: &Globals<'_>,
    budget: Budget,
) -> Result<Verified, Rejection> {
    let reject = |insn: usize, reason: Reason| Rejection { insn, reason };
    let prune = check_structure(insns, refs).map_err(|(i, r)| reject(i, r))?;
    let flow = dataflow::Flow::new(insns);
    let mut x = Explorer {
        insns,
        refs,
        globals,
        live: flow.live(),
        demanded: flow.demanded(),
        merge: flow.merges(),
        prune,
        nodes: Vec::new(),
        states: Vec::new(),
        seen: FastMap::default(),
        recent: vec![Vec::new(); insns.len()],
        visits: vec![0; insns.len()],
        work: BinaryHeap::new(),
        processed: 0,
        budget,
        start: Instant::now(),
        stack_used: 0,
        next_id: 0,
        joins: FastMap::default(),
        thresholds: Thresholds::new(
            insns
                .iter()
                .filter(|i| i.class() == class::JMP || i.class() == class::JMP32)
                .map(|i| i.imm as i64 as u64)
                .chain(
                    [
                        abi::WINDOW_SIZE,
                        abi::SCRATCH_SIZE,
                        abi::ARG_SIZE,
                        STACK_SIZE,
                    ]
                    .map(|n| n as u64),
                ),
        ),
    };
    let mut regs = [Value::Uninit; 11];
    regs[1] = ptr(Region::Ctx, 0);
    regs[FP] = ptr(Region::Stack, STACK_SIZE as i64);
    x.nodes.push(Node {
        parents: Vec::new(),
        pc: 0,
        iter: 0,
        pending: 0,
        walked: false,
        done: false,
        cost: 0,
    });
    x.states.push(Some(State {
        regs,
        links: [Link::NONE; 11],
        stack: Vec::new(),
    }));
    x.work.push(Reverse((0, 0, 0)));
    while let Some(Reverse((_, _, n))) = x.work.pop() {
        x.walk(n)?;
    }
    if !x.nodes[0].done {
        // Some node waits for itself: a cycle the loop check should have caught. Refuse
        // rather than trust a bound that was never established.
        let head = (0..x.visits.len())
            .max_by_key(|&i| x.visits[i])
            .unwrap_or(0);
        return Err(reject(head, Reason::Loop));
    }
    if !x.nodes[0].done {
        // Some node waits for itself: a cycle the loop check should have caught. Refuse
        // rather than trust a bound that was never established.
        let head = (0..x.visits.len())
            .max_by_key(|&i| x.visits[i])
            .unwrap_or(0);
        return Err(reject(head, Reason::Loop));
    }
    if std::env::var_os("NEARFS_VERIFY_DEBUG").is_some() {
        let mut v: Vec<(u32, usize)> = x.visits.iter().copied().zip(0..).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        eprintln!("visits: {:?}", &v[..v.len().min(12)]);
        let hot = v[0].1;
        for (k, node) in x
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.pc == hot)
            .take(40)
        {
            if let Some(st) = &x.states[k] {
                eprintln!("iter {} regs {:?} links {:?}", node.iter, st.regs, st.links);
            }
        }
    }
    Ok(Verified {
        max_insns: x.nodes[0].cost,
        processed: x.processed,
        states: x.states.iter().filter(|s| s.is_some()).count(),
        stack: x.stack_used,
    })
}

fn ptr(region: Region, off: i64) -> Value {
    Value::Ptr {
        region,
        off: Range::konst(off as u64),
    }
}

fn scalar(r: Range) -> Value {
    Value::Scalar(r)
}

/// Checks what does not depend on values; returns which slots are jump targets.
fn check_structure(insns: &[Insn], refs: &[DataRef]) -> Result<Vec<bool>, (usize, Reason)> {
    let n = insns.len();
    if n > crate::elf::MAX_INSNS {
        return Err((0, Reason::TooLarge { insns: n }));
    }
    let mut prune = vec![false; n];
    let mut second = vec![false; n];
    let mut pc = 0;
    while pc < n {
        let i = &insns[pc];
        insn::check_isa(i).map_err(|u| (pc, Reason::Unsupported(u)))?;
        if i.dst > 10 || i.src > 10 && i.class() != class::LD {
            return Err((pc, Reason::BadRegister(i.dst.max(i.src))));
        }
        let writes_dst = matches!(
            i.class(),
            class::ALU | class::ALU64 | class::LDX | class::LD
        );
        if writes_dst && i.dst as usize == FP {
            return Err((pc, Reason::FramePointerWrite));
        }
        if i.is_lddw() {
            if pc + 1 >= n || insns[pc + 1].op != 0 {
                return Err((pc, Reason::Unsupported(Unsupported::Invalid)));
            }
            second[pc + 1] = true;
            pc += 2;
            continue;
        }
        if matches!(i.class(), class::JMP | class::JMP32) {
            match i.op & 0xf0 {
                jmp::CALL if i.src != CALL_HELPER => return Err((pc, Reason::LocalCall)),
                // The JIT compiles every instruction, reachable or not, and needs the helper.
                jmp::CALL if abi::prototype(i.imm).is_none() => {
                    return Err((pc, Reason::UnknownHelper(i.imm)));
                }
                jmp::CALL | jmp::EXIT => {}
                code => {
                    let t = pc as i64 + 1 + i64::from(i.off);
                    if t < 0 || t >= n as i64 {
                        return Err((pc, Reason::JumpOutside));
                    }
                    prune[t as usize] = true;
                    if code != jmp::JA && pc + 1 < n {
                        prune[pc + 1] = true;
                    }
                }
            }
        }
        pc += 1;
    }
    if let Some(t) = (0..n).find(|&t| prune[t] && second[t]) {
        return Err((t, Reason::JumpIntoLddw));
    }
    if let Some(r) = refs
        .iter()
        .find(|r| r.insn >= n || !insns[r.insn].is_lddw())
    {
        return Err((r.insn, Reason::Unsupported(Unsupported::Invalid)));
    }
    match insns.last() {
        Some(i) if i.op == class::JMP | jmp::EXIT || i.op == class::JMP | jmp::JA => Ok(prune),
        _ => Err((n.saturating_sub(1), Reason::FallsOffEnd)),
    }
}

/// Conditions of conditional jumps, on the operands' values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cond {
    Eq,
    Ne,
    Ugt,
    Uge,
    Ult,
    Ule,
    Sgt,
    Sge,
    Slt,
    Sle,
    Set,
    NotSet,
}

impl Cond {
    fn of(code: u8) -> Cond {
        match code {
            jmp::JEQ => Cond::Eq,
            jmp::JNE => Cond::Ne,
            jmp::JGT => Cond::Ugt,
            jmp::JGE => Cond::Uge,
            jmp::JLT => Cond::Ult,
            jmp::JLE => Cond::Ule,
            jmp::JSGT => Cond::Sgt,
            jmp::JSGE => Cond::Sge,
            jmp::JSLT => Cond::Slt,
            jmp::JSLE => Cond::Sle,
            _ => Cond::Set,
        }
    }

    fn negate(self) -> Cond {
        match self {
            Cond::Eq => Cond::Ne,
            Cond::Ne => Cond::Eq,
            Cond::Ugt => Cond::Ule,
            Cond::Uge => Cond::Ult,
            Cond::Ult => Cond::Uge,
            Cond::Ule => Cond::Ugt,
            Cond::Sgt => Cond::Sle,
            Cond::Sge => Cond::Slt,
            Cond::Slt => Cond::Sge,
            Cond::Sle => Cond::Sgt,
            Cond::Set => Cond::NotSet,
            Cond::NotSet => Cond::Set,
        }
    }

    /// The same comparison on values known to lie in 0..=i64::MAX, as an unsigned one.
    fn unsigned(self) -> Cond {
        match self {
            Cond::Sgt => Cond::Ugt,
            Cond::Sge => Cond::Uge,
            Cond::Slt => Cond::Ult,
            Cond::Sle => Cond::Ule,
            c => c,
        }
    }

    /// The same comparison of pointer offsets, which are signed.
    fn signed(self) -> Cond {
        match self {
            Cond::Ugt => Cond::Sgt,
            Cond::Uge => Cond::Sge,
            Cond::Ult => Cond::Slt,
            Cond::Ule => Cond::Sle,
            c => c,
        }
    }
}

/// Narrows `a` and `b` to the values for which `a cond b` holds; `None` if none do.
fn refine(cond: Cond, mut a: Range, mut b: Range) -> Option<(Range, Range)> {
    match cond {
        Cond::Eq => {
            let both = Range {
                umin: a.umin.max(b.umin),
                umax: a.umax.min(b.umax),
                smin: a.smin.max(b.smin),
                smax: a.smax.min(b.smax),
            }
            .sync()?;
            return Some((both, both));
        }
        Cond::Ne => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x != y).then_some((a, b));
            }
            let (ka, kb) = (a.constant(), b.constant());
            for (v, k) in [(&mut a, kb), (&mut b, ka)] {
                if let Some(k) = k {
                    if v.umin == k {
                        v.umin = k.checked_add(1)?;
                    }
                    if v.umax == k {
                        v.umax = k.checked_sub(1)?;
                    }
                    if v.smin == k as i64 {
                        v.smin = (k as i64).checked_add(1)?;
                    }
                    if v.smax == k as i64 {
                        v.smax = (k as i64).checked_sub(1)?;
                    }
                }
            }
        }
        Cond::Ugt => {
            a.umin = a.umin.max(b.umin.checked_add(1)?);
            b.umax = b.umax.min(a.umax.checked_sub(1)?);
        }
        Cond::Uge => {
            a.umin = a.umin.max(b.umin);
            b.umax = b.umax.min(a.umax);
        }
        Cond::Ult => return refine(Cond::Ugt, b, a).map(|(b, a)| (a, b)),
        Cond::Ule => return refine(Cond::Uge, b, a).map(|(b, a)| (a, b)),
        Cond::Sgt => {
            a.smin = a.smin.max(b.smin.checked_add(1)?);
            b.smax = b.smax.min(a.smax.checked_sub(1)?);
        }
        Cond::Sge => {
            a.smin = a.smin.max(b.smin);
            b.smax = b.smax.min(a.smax);
        }
        Cond::Slt => return refine(Cond::Sgt, b, a).map(|(b, a)| (a, b)),
        Cond::Sle => return refine(Cond::Sge, b, a).map(|(b, a)| (a, b)),
        Cond::Set => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x & y != 0).then_some((a, b));
            }
            if a.umax == 0 || b.umax == 0 {
                return None;
            }
        }
        Cond::NotSet => {
            if let (Some(x), Some(y)) = (a.constant(), b.constant()) {
                return (x & y == 0).then_some((a, b));
            }
        }
    }
    Some((a.sync()?, b.sync()?))
}

/// `refine` for a 32-bit comparison: exact when both sides fit in 31 bits; otherwise only
/// constants are decided and nothing is narrowed.
fn refine32(cond: Cond, a: Range, b: Range) -> Option<(Range, Range)> {
    let small = |r: &Range| r.umax <= i32::MAX as u64;
    if small(&a) && small(&b) {
        return refine(cond.unsigned(), a, b);
    }
    let (a32, b32) = (a.low32(), b.low32());
    if let (Some(x), Some(y)) = (a32.constant(), b32.constant()) {
        let (sx, sy) = (x as u32 as i32, y as u32 as i32);
        let holds = match cond {
            Cond::Eq => x == y,
            Cond::Ne => x != y,
            Cond::Ugt => x > y,
            Cond::Uge => x >= y,
            Cond::Ult => x < y,
            Cond::Ule => x <= y,
            Cond::Sgt => sx > sy,
            Cond::Sge => sx >= sy,
            Cond::Slt => sx < sy,
            Cond::Sle => sx <= sy,
            Cond::Set => x & y != 0,
            Cond::NotSet => x & y == 0,
        };
        return holds.then_some((a, b));
    }
    Some((a, b))
}

struct Explorer<'p> {
    insns: &'p [Insn],
    refs: &'p [DataRef],
    globals: &'p Globals<'p>,
    live: Vec<u16>,
    demanded: Vec<u16>,
    /// Whether two or more edges enter a slot: only there can paths meet, so only there
    /// are states kept and compared (every loop passes through one).
    merge: Vec<bool>,
    prune: Vec<bool>,
    nodes: Vec<Node>,
    /// The state each node started in, kept for pruning.
    states: Vec<Option<State>>,
    /// Nodes by (slot, hash of state), for exact matches.
    seen: FastMap<(usize, u64), Vec<u32>>,
    /// The latest nodes at each slot, for coverage by a wider state.
    recent: Vec<Vec<u32>>,
    visits: Vec<u32>,
    /// Nodes to walk, fewest loop iterations first, then in instruction order: paths of
    /// one iteration meet at their merge points before either goes on, so they are
    /// joined once instead of each exploring the rest of the loop.
    work: BinaryHeap<Reverse<(u32, usize, u32)>>,
    processed: u64,
    budget: Budget,
    start: Instant,
    stack_used: usize,
    next_id: u32,
    thresholds: Thresholds,
    /// Joins so far by point and state shape (see `State::shape_hash`).
    joins: FastMap<(usize, u64), u32>,
}

const RECENT: usize = 16;
/// Pending states of one iteration at one point before their constants are joined.
const CROWD: usize = 4;
/// Joins at one point before ranges are widened.
const WIDEN_AFTER: u32 = 8;

impl Explorer<'_> {
    /// Runs node `n`'s path from `pc` to its next jump target, branch or exit.
    fn walk(&mut self, n: u32) -> Result<(), Rejection> {
        let (mut pc, iter) = (self.nodes[n as usize].pc, self.nodes[n as usize].iter);
        // Only merge points keep their state, for pruning.
        let mut state = if self.merge[pc] {
            self.states[n as usize].clone()
        } else {
            self.states[n as usize].take()
        }
        .expect("a node to walk has its state");
        // Walked from now on: a path that comes back here meets a walked node.
        self.nodes[n as usize].walked = true;
        let mut len = 0u64;
        loop {
            if len > 0 && self.prune[pc] {
                self.arrive(n, len, state, pc, iter)?;
                break;
            }
            self.processed += 1;
            len += 1;
            if self.processed > self.budget.insns || self.nodes.len() > self.budget.states {
                let head = (0..self.visits.len())
                    .max_by_key(|&i| self.visits[i])
                    .unwrap_or(pc);
                return Err(Rejection {
                    insn: head,
                    reason: Reason::TooComplex {
                        processed: self.processed,
                    },
                });
            }
            if self.processed.is_multiple_of(4096) && self.start.elapsed() > self.budget.time {
                return Err(Rejection {
                    insn: pc,
                    reason: Reason::Timeout,
                });
            }
            let flow = self
                .step(&mut state, pc)
                .map_err(|reason| Rejection { insn: pc, reason })?;
            // A jump to an earlier (or the same) instruction starts another iteration.
            let next_iter = |t: usize| iter + u32::from(t <= pc);
            match flow {
                Flow::Next(k) => pc += k,
                Flow::Jump(t) => {
                    self.arrive(n, len, state, t, next_iter(t))?;
                    break;
                }
                Flow::Exit => {
                    let node = &mut self.nodes[n as usize];
                    node.cost = node.cost.max(len);
                    break;
                }
                Flow::Branch(ways) => {
                    for (s, t) in ways {
                        self.arrive(n, len, s, t, next_iter(t))?;
                    }
                    break;
                }
            }
        }
        self.finish(n);
        Ok(())
    }

    /// Whether `m` lies on a path from the start to `n`. Iteration counts only grow
    /// along paths, so the search stays among nodes no earlier than `m`'s iteration.
    fn is_ancestor(&self, m: u32, n: u32) -> bool {
        let floor = self.nodes[m as usize].iter;
        let mut stack = vec![n];
        let mut seen = std::collections::HashSet::<u32, BuildHasherDefault<FastHasher>>::default();
        while let Some(k) = stack.pop() {
            if k == m {
                return true;
            }
            for &(p, _) in &self.nodes[k as usize].parents {
                if self.nodes[p as usize].iter >= floor && seen.insert(p) {
                    stack.push(p);
                }
            }
        }
        false
    }

    /// Node `n`'s path reached jump target `pc` after `len` instructions and `iter`
    /// back-edges.
    fn arrive(
        &mut self,
        n: u32,
        len: u64,
        mut state: State,
        pc: usize,
        iter: u32,
    ) -> Result<(), Rejection> {
        state.canonical(self.live[pc] | 1 << FP, self.demanded[pc]);
        self.visits[pc] += 1;
        if !self.merge[pc] {
            self.child(n, len, state, pc, iter, None);
            return Ok(());
        }
        let hash = state.hash64();
        let exact = self.seen.get(&(pc, hash)).into_iter().flatten();
        let wider = self.recent[pc].iter();
        let cover = exact.chain(wider).copied().find(|&m| {
            self.states[m as usize]
                .as_ref()
                .is_some_and(|s| s.covers(&state))
        });
        if let Some(m) = cover {
            let node = &self.nodes[m as usize];
            if node.done {
                let cost = len.saturating_add(node.cost);
                let parent = &mut self.nodes[n as usize];
                parent.cost = parent.cost.max(cost);
                return Ok(());
            }
            // Coming back to a state this very path was in: nothing bounds the loop.
            // (An ancestor at the same point is at least one back-edge earlier.)
            if node.walked && node.iter < iter && self.is_ancestor(m, n) {
                return Err(Rejection {
                    insn: pc,
                    reason: Reason::Loop,
                });
            }
            self.attach(n, len, m);
            return Ok(());
        }
        // A state of the same shape here (same constants, such as a loop counter) that is
        // not walked yet absorbs this one; a finished one is joined with it into a new
        // node. Either way, paths that differ only in ranges stop multiplying.
        let pending_here = |x: &Self, m: u32| {
            let node = &x.nodes[m as usize];
            !node.walked && node.iter == iter
        };
        let mut similar = self.recent[pc].iter().rev().copied().find(|&m| {
            (self.nodes[m as usize].done || pending_here(self, m))
                && self.states[m as usize]
                    .as_ref()
                    .is_some_and(|s| s.same_shape(&state))
        });
        // Many paths of one iteration waiting at one point, differing in constants (a
        // search narrowing its bounds): they share every per-iteration counter, so their
        // other constants may be joined into ranges without losing the loop's bound.
        let crowd: Vec<u32> = self.recent[pc]
            .iter()
            .copied()
            .filter(|&m| pending_here(self, m))
            .collect();
        if similar.is_none() && crowd.len() >= CROWD {
            similar = crowd.into_iter().rev().find(|&m| {
                self.states[m as usize]
                    .as_ref()
                    .is_some_and(|s| s.same_kinds(&state))
            });
        }
        if let Some(m) = similar {
            // Unions first, which keep every bound a test established; only a point joined
            // again and again is widened, so that ranges stop growing.
            let joins = self.joins.entry((pc, state.shape_hash())).or_default();
            *joins += 1;
            let widen = (*joins > WIDEN_AFTER).then_some(&self.thresholds);
            let old = self.states[m as usize].as_ref().unwrap();
            let joined = old.join(&state, widen);
            if !self.nodes[m as usize].walked {
                let hash = joined.hash64();
                self.seen.entry((pc, hash)).or_default().push(m);
                self.states[m as usize] = Some(joined);
                self.attach(n, len, m);
                return Ok(());
            }
            state = joined;
        }
        let hash = state.hash64();
        self.child(n, len, state, pc, iter, Some(hash));
        Ok(())
    }

    /// Makes `m` a child of `n`: `n` finishes after `m` and counts its cost.
    fn attach(&mut self, n: u32, len: u64, m: u32) {
        self.nodes[m as usize].parents.push((n, len));
        self.nodes[n as usize].pending += 1;
    }

    /// A new node for `n`'s path at `pc`, kept for pruning if `hash` is given.
    fn child(&mut self, n: u32, len: u64, state: State, pc: usize, iter: u32, hash: Option<u64>) {
        let m = self.nodes.len() as u32;
        self.nodes.push(Node {
            parents: Vec::new(),
            pc,
            iter,
            pending: 0,
            walked: false,
            done: false,
            cost: 0,
        });
        self.attach(n, len, m);
        if let Some(hash) = hash {
            self.seen.entry((pc, hash)).or_default().push(m);
            let recent = &mut self.recent[pc];
            if recent.len() == RECENT {
                recent.remove(0);
            }
            recent.push(m);
        }
        self.states.push(Some(state));
        self.work.push(Reverse((iter, pc, m)));
    }

    /// Marks `n` done if its path and everything it waits for are, and passes its cost to
    /// the nodes waiting for it.
    fn finish(&mut self, n: u32) {
        let mut ready = vec![n];
        while let Some(n) = ready.pop() {
            let node = &mut self.nodes[n as usize];
            if !node.walked || node.pending > 0 || node.done {
                continue;
            }
            node.done = true;
            let cost = node.cost;
            for (p, len) in std::mem::take(&mut node.parents) {
                let pn = &mut self.nodes[p as usize];
                pn.cost = pn.cost.max(len.saturating_add(cost));
                pn.pending -= 1;
                if pn.pending == 0 {
                    ready.push(p);
                }
            }
        }
    }

    fn read(&self, state: &State, r: u8) -> Result<Value, Reason> {
        match state.regs[r as usize] {
            Value::Uninit => Err(Reason::Uninit { reg: r }),
            v => Ok(v),
        }
    }

    fn step(&mut self, state: &mut State, pc: usize) -> Result<Flow, Reason> {
        let i = self.insns[pc];
        match i.class() {
            class::ALU | class::ALU64 => {
                self.alu(state, &i)?;
                Ok(Flow::Next(1))
            }
            class::LD => {
                let v = match self.refs.iter().find(|r| r.insn == pc) {
                    Some(r) => Value::Ptr {
                        region: Region::Global(r.region as u16),
                        off: Range::konst(r.offset),
                    },
                    None => {
                        let hi = self.insns[pc + 1].imm as u32 as u64;
                        scalar(Range::konst(hi << 32 | i.imm as u32 as u64))
                    }
                };
                state.set(i.dst, v);
                Ok(Flow::Next(2))
            }
            class::LDX => {
                let (v, link) = self.access(state, i.src, i.off, size_of_op(i.op), None)?;
                state.set(i.dst, v);
                state.links[i.dst as usize] = link;
                Ok(Flow::Next(1))
            }
            class::ST | class::STX => {
                let (v, id) = if i.class() == class::ST {
                    let size = size_of_op(i.op);
                    let imm = i.imm as i64 as u64;
                    let v = scalar(Range::konst(if size == 8 {
                        imm
                    } else {
                        imm & ((1u64 << (8 * size)) - 1)
                    }));
                    (v, Link::NONE)
                } else {
                    let v = self.read(state, i.src)?;
                    (v, self.link_of(state, i.src))
                };
                self.access(state, i.dst, i.off, size_of_op(i.op), Some((v, id)))?;
                Ok(Flow::Next(1))
            }
            _ => self.jump(state, &i, pc),
        }
    }

    /// The link of register `r`, giving it a fresh id if it has none. r10 never changes,
    /// so it needs none.
    fn link_of(&mut self, state: &mut State, r: u8) -> Link {
        if r as usize == FP {
            return Link::NONE;
        }
        if state.links[r as usize].id == 0 {
            self.next_id += 1;
            state.links[r as usize] = Link {
                id: self.next_id,
                delta: 0,
            };
        }
        state.links[r as usize]
    }

    fn alu(&mut self, state: &mut State, i: &Insn) -> Result<(), Reason> {
        let code = i.op & 0xf0;
        let is64 = i.class() == class::ALU64;
        let x = i.op & SRC_X != 0 && !matches!(code, alu::NEG | alu::END);
        let src = if x {
            self.read(state, i.src)?
        } else {
            scalar(Range::konst(i.imm as i64 as u64))
        };
        let dst = if code == alu::MOV {
            Value::Uninit
        } else {
            self.read(state, i.dst)?
        };
        if matches!(code, alu::DIV | alu::MOD)
            && let Value::Scalar(s) = src
        {
            let s = if is64 { s } else { s.low32() };
            if s.may_be_zero() {
                return Err(Reason::DivByZero);
            }
        }
        let out = match (dst, src) {
            (_, Value::Scalar(s)) if code == alu::MOV => scalar(if is64 { s } else { s.low32() }),
            (_, p @ Value::Ptr { .. }) if code == alu::MOV => {
                if !is64 {
                    return Err(Reason::PointerLeak("truncating a pointer to 32 bits"));
                }
                p
            }
            (Value::Scalar(d), Value::Scalar(s)) => scalar(alu_range(i.op, d, s, i.imm)),
            (Value::Ptr { region, off }, Value::Scalar(s)) => {
                if !is64 || !matches!(code, alu::ADD | alu::SUB) {
                    return Err(Reason::PointerArithmetic(
                        "only adding or subtracting a number (64-bit) keeps a pointer",
                    ));
                }
                Value::Ptr {
                    region,
                    off: alu_range(class::ALU64 | code | SRC_X, off, s, 0),
                }
            }
            (Value::Scalar(d), Value::Ptr { region, off }) => {
                if !is64 || code != alu::ADD {
                    return Err(Reason::PointerArithmetic(
                        "a number minus a pointer, or 32-bit arithmetic on a pointer",
                    ));
                }
                Value::Ptr {
                    region,
                    off: alu_range(class::ALU64 | alu::ADD | SRC_X, off, d, 0),
                }
            }
            (Value::Ptr { region: r, off: a }, Value::Ptr { region: q, off: b }) => {
                if !is64 || code != alu::SUB || r != q {
                    return Err(Reason::PointerArithmetic(
                        "two pointers can only be subtracted, and only within one region",
                    ));
                }
                scalar(alu_range(class::ALU64 | alu::SUB | SRC_X, a, b, 0))
            }
            _ => unreachable!("uninitialised operands were refused"),
        };
        let before = state.links[i.dst as usize];
        state.set(i.dst, out);
        let by = match src {
            Value::Scalar(s) if is64 => s.constant().map(|c| c as i64),
            _ => None,
        };
        if code == alu::MOV && is64 && x {
            state.links[i.dst as usize] = self.link_of(state, i.src);
        } else if let (alu::ADD | alu::SUB, Some(c), true) = (code, by, before.id != 0) {
            let delta = if code == alu::ADD {
                before.delta.wrapping_add(c)
            } else {
                before.delta.wrapping_sub(c)
            };
            state.links[i.dst as usize] = Link { delta, ..before };
        }
        Ok(())
    }

    fn region_size(&self, r: Region) -> i64 {
        (match r {
            Region::Ctx => ctx::SIZE,
            Region::Data => abi::WINDOW_SIZE,
            Region::Stack => STACK_SIZE,
            Region::Scratch => abi::SCRATCH_SIZE,
            Region::Arg => abi::ARG_SIZE,
            Region::Global(g) => self.globals.sizes.get(g as usize).copied().unwrap_or(0),
        }) as i64
    }

    /// Checks that `len` bytes at `base + off` lie in the base pointer's region.
    fn bounds(
        &self,
        base: Value,
        reg: u8,
        off: i64,
        len: Range,
    ) -> Result<(Region, i64, i64), Reason> {
        let Value::Ptr { region, off: o } = base else {
            return Err(match base {
                Value::Uninit => Reason::Uninit { reg },
                _ => Reason::NotPointer { reg },
            });
        };
        let size = self.region_size(region);
        let lo = o.smin.checked_add(off);
        let hi = o
            .smax
            .checked_add(off)
            .and_then(|h| h.checked_add(i64::try_from(len.umax).ok()?));
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo >= 0 && hi <= size => Ok((region, lo, hi)),
            _ => Err(Reason::OutOfBounds {
                region,
                lo: lo.unwrap_or(i64::MIN),
                hi: hi.unwrap_or(i64::MAX),
                size,
            }),
        }
    }

    /// A load (`store` is `None`) or store of `size` bytes at `reg + off`.
    fn access(
        &mut self,
        state: &mut State,
        reg: u8,
        off: i16,
        size: i64,
        store: Option<(Value, Link)>,
    ) -> Result<(Value, Link), Reason> {
        let base = state.regs[reg as usize];
        let (region, lo, hi) = self.bounds(base, reg, i64::from(off), Range::konst(size as u64))?;
        let exact = hi - lo == size;
        if let Some((v, _)) = store
            && matches!(v, Value::Ptr { .. })
            && region != Region::Stack
        {
            return Err(Reason::PointerLeak("storing a pointer outside the stack"));
        }
        match region {
            Region::Ctx => {
                if !exact {
                    return Err(Reason::CtxField { off: lo, size });
                }
                self.ctx_field(lo, size, store.map(|(v, _)| v))
                    .map(|v| (v, Link::NONE))
            }
            Region::Stack => {
                self.stack_used = self.stack_used.max((STACK_SIZE as i64 - lo) as usize);
                match store {
                    Some((v, link)) => {
                        stack_store(state, lo, hi, size, exact, v, link)?;
                        Ok((v, Link::NONE))
                    }
                    None => {
                        let (v, link) = stack_load(state, lo, hi, size, exact)?;
                        let (k, _) = State::locate(lo);
                        match state.slot(k) {
                            // A fill: the register and the slot stay linked, so a test on
                            // the register narrows the saved copy too.
                            Slot::Spill(w, l) if l.id == 0 && exact && size == 8 && lo % 8 == 0 => {
                                self.next_id += 1;
                                let link = Link {
                                    id: self.next_id,
                                    delta: 0,
                                };
                                state.set_slot(k, Slot::Spill(w, link));
                                Ok((v, link))
                            }
                            _ => Ok((v, link)),
                        }
                    }
                }
            }
            _ if store.is_some() && region != Region::Scratch => Err(Reason::ReadOnly { region }),
            _ => Ok((scalar(Range::width(size as u32)), Link::NONE)),
        }
    }

    fn ctx_field(&self, off: i64, size: i64, store: Option<Value>) -> Result<Value, Reason> {
        let whole = size == 8 && off % 8 == 0;
        if off < i64::from(ctx::ARG_LEN) && !whole {
            // Part of a pointer field.
            return Err(Reason::CtxField { off, size });
        }
        let pointer = match off as i16 {
            ctx::DATA => Some(Region::Data),
            ctx::DATA_END => None,
            ctx::SCRATCH => Some(Region::Scratch),
            ctx::ARG => Some(Region::Arg),
            _ => {
                return match store {
                    Some(Value::Scalar(_)) if whole && off as i16 == ctx::NEXT => Ok(Value::Uninit),
                    Some(_) => Err(Reason::CtxField { off, size }),
                    None if off as i16 == ctx::ARG_LEN && whole => {
                        Ok(scalar(Range::unsigned(0, abi::ARG_SIZE as u64).unwrap()))
                    }
                    None => Ok(scalar(Range::width(size as u32))),
                };
            }
        };
        if store.is_some() || !whole {
            return Err(Reason::CtxField { off, size });
        }
        Ok(match pointer {
            Some(region) => ptr(region, 0),
            None => ptr(Region::Data, abi::WINDOW_SIZE as i64),
        })
    }

    fn jump(&mut self, state: &mut State, i: &Insn, pc: usize) -> Result<Flow, Reason> {
        let code = i.op & 0xf0;
        let target = (pc as i64 + 1 + i64::from(i.off)) as usize;
        match code {
            jmp::EXIT => {
                return match self.read(state, 0)? {
                    Value::Ptr { .. } => Err(Reason::ReturnsPointer),
                    _ => Ok(Flow::Exit),
                };
            }
            jmp::CALL => {
                self.call(state, i.imm)?;
                return Ok(Flow::Next(1));
            }
            jmp::JA => return Ok(Flow::Jump(target)),
            _ => {}
        }
        let is32 = i.class() == class::JMP32;
        let a = self.read(state, i.dst)?;
        let b = if i.op & SRC_X != 0 {
            self.read(state, i.src)?
        } else {
            let imm = i.imm as i64 as u64;
            scalar(Range::konst(if is32 { imm as u32 as u64 } else { imm }))
        };
        let cond = Cond::of(code);
        let mut ways = Vec::with_capacity(2);
        for (c, to) in [(cond, target), (cond.negate(), pc + 1)] {
            let narrowed = match (a, b) {
                (Value::Scalar(x), Value::Scalar(y)) if is32 => refine32(c, x, y),
                (Value::Scalar(x), Value::Scalar(y)) => refine(c, x, y),
                (Value::Ptr { region: r, off: x }, Value::Ptr { region: q, off: y })
                    if r == q && !is32 && !matches!(c, Cond::Set | Cond::NotSet) =>
                {
                    refine(c.signed(), x, y)
                }
                _ => return Err(Reason::PointerCompare),
            };
            let Some((x, y)) = narrowed else { continue };
            let mut s = state.clone();
            if !s.narrow(i.dst, with_range(a, x)) {
                continue;
            }
            if i.op & SRC_X != 0 && !s.narrow(i.src, with_range(b, y)) {
                continue;
            }
            ways.push((s, to));
        }
        Ok(Flow::Branch(ways))
    }

    fn call(&mut self, state: &mut State, id: i32) -> Result<(), Reason> {
        let proto = abi::prototype(id).ok_or(Reason::UnknownHelper(id))?;
        let bad = |arg: usize, why| Reason::HelperArg {
            helper: proto.name,
            arg,
            why,
        };
        for (k, kind) in proto.args.iter().enumerate() {
            let reg = k as u8 + 1;
            let v = match state.regs[reg as usize] {
                Value::Uninit => return Err(bad(k + 1, "not initialised")),
                v => v,
            };
            let (writes, len_arg) = match *kind {
                Arg::Scalar | Arg::Len => {
                    if matches!(v, Value::Ptr { .. }) {
                        return Err(bad(
                            k + 1,
                            "a pointer where a number is expected (pointer leak)",
                        ));
                    }
                    continue;
                }
                Arg::ReadMem(l) => (false, l),
                Arg::WriteMem(l) => (true, l),
            };
            let Value::Scalar(len) = state.regs[len_arg as usize] else {
                return Err(bad(
                    len_arg as usize,
                    "the length must be an initialised number",
                ));
            };
            let (region, lo, hi) = self
                .bounds(v, reg, 0, len)
                .map_err(|_| bad(k + 1, "the memory it names (pointer and length) does not lie within one region; bound the length"))?;
            match region {
                Region::Ctx => return Err(bad(k + 1, "the context cannot be passed to helpers")),
                Region::Stack => {
                    self.stack_used = self.stack_used.max((STACK_SIZE as i64 - lo) as usize);
                    if writes {
                        let definite = match v {
                            Value::Ptr { off, .. } if off.constant().is_some() => {
                                Some(lo + len.umin.min(STACK_SIZE as u64) as i64)
                            }
                            _ => None,
                        };
                        helper_writes_stack(state, lo, hi, definite).map_err(|_| {
                            bad(k + 1, "it would overwrite a pointer saved on the stack")
                        })?;
                    } else if !stack_readable(state, lo, hi) {
                        return Err(bad(
                            k + 1,
                            "stack bytes not all initialised, or holding a pointer",
                        ));
                    }
                }
                Region::Scratch => {}
                _ if writes => {
                    return Err(bad(
                        k + 1,
                        "the helper writes here, and this memory is read-only",
                    ));
                }
                _ => {}
            }
        }
        for r in 1..=5 {
            state.set(r, Value::Uninit);
        }
        state.set(0, scalar(Range::UNKNOWN));
        Ok(())
    }
}

fn with_range(v: Value, r: Range) -> Value {
    match v {
        Value::Scalar(_) => Value::Scalar(r),
        Value::Ptr { region, .. } => Value::Ptr { region, off: r },
        Value::Uninit => Value::Uninit,
    }
}

fn size_of_op(op: u8) -> i64 {
    match op & 0x18 {
        mem::B => 1,
        mem::H => 2,
        mem::W => 4,
        _ => 8,
    }
}

/// Whether stack bytes `lo..hi` all hold numbers.
fn stack_readable(state: &State, lo: i64, hi: i64) -> bool {
    (lo..hi).all(|o| {
        let (k, b) = State::locate(o);
        state.slot(k).readable(b, 1)
    })
}

fn stack_load(
    state: &State,
    lo: i64,
    hi: i64,
    size: i64,
    exact: bool,
) -> Result<(Value, Link), Reason> {
    let (k, b) = State::locate(lo);
    if exact && size == 8 && b == 0 {
        return match state.slot(k) {
            Slot::Spill(v, link) => Ok((v, link)),
            Slot::Bytes(0xff) => Ok((scalar(Range::UNKNOWN), Link::NONE)),
            _ => Err(Reason::UninitStack {
                off: lo - STACK_SIZE as i64,
                size,
            }),
        };
    }
    for o in lo..hi {
        let (k, b) = State::locate(o);
        match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            s if !s.readable(b, 1) => {
                return Err(Reason::UninitStack {
                    off: lo - STACK_SIZE as i64,
                    size,
                });
            }
            _ => {}
        }
    }
    Ok((scalar(Range::width(size as u32)), Link::NONE))
}

fn stack_store(
    state: &mut State,
    lo: i64,
    hi: i64,
    size: i64,
    exact: bool,
    v: Value,
    link: Link,
) -> Result<(), Reason> {
    let (k, b) = State::locate(lo);
    if exact && size == 8 && b == 0 {
        state.set_slot(k, Slot::Spill(v, link));
        return Ok(());
    }
    if matches!(v, Value::Ptr { .. }) {
        return Err(Reason::PointerLeak("storing part of a pointer"));
    }
    for o in lo..hi {
        let (k, b) = State::locate(o);
        let s = match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            Slot::Spill(..) => Slot::Bytes(0xff),
            // A store at an offset not known exactly initialises nothing for certain.
            Slot::Bytes(m) if exact => Slot::Bytes(m | 1 << b),
            s => s,
        };
        state.set_slot(k, s);
    }
    Ok(())
}

/// A helper writes somewhere in stack bytes `lo..hi`, certainly in `lo..definite`.
fn helper_writes_stack(
    state: &mut State,
    lo: i64,
    hi: i64,
    definite: Option<i64>,
) -> Result<(), Reason> {
    for o in lo..hi {
        let (k, b) = State::locate(o);
        let s = match state.slot(k) {
            Slot::Spill(Value::Ptr { .. }, _) => return Err(Reason::SpilledPointer),
            Slot::Spill(..) => Slot::Bytes(0xff),
            Slot::Bytes(m) if definite.is_some_and(|d| o < d) => Slot::Bytes(m | 1 << b),
            s => s,
        };
        state.set_slot(k, s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;

    fn check(text: &str) -> Result<Verified, Rejection> {
        let insns = assemble(text).unwrap();
        verify(&insns, &[], &Globals { sizes: &[] }, Budget::default())
    }

    fn accepts(text: &str) -> Verified {
        check(text).unwrap_or_else(|r| panic!("rejected: {r}\n{text}"))
    }

    #[test]
    fn a_data_end_check_on_a_moved_copy_bounds_the_original() {
        accepts(
            "ldxdw %r2, [%r1]
             ldxdw %r3, [%r1+8]
             ldxh %r4, [%r2]
             add %r2, %r4
             mov %r5, %r2
             add %r5, 8
             jgt %r5, %r3, out
             ldxdw %r0, [%r2]
             exit
             out:
             mov %r0, 0
             exit",
        );
    }

    #[test]
    fn a_test_on_a_register_narrows_its_spilled_copy() {
        accepts(
            "ldxdw %r2, [%r1]
             ldxdw %r4, [%r1+32]
             stxdw [%r10-8], %r4
             jgt %r4, 4095, out
             ldxdw %r5, [%r10-8]
             add %r2, %r5
             ldxb %r0, [%r2]
             exit
             out:
             mov %r0, 0
             exit",
        );
    }

    #[test]
    fn spilled_pointers_keep_their_type() {
        accepts("stxdw [%r10-8], %r1\nldxdw %r2, [%r10-8]\nldxdw %r0, [%r2+40]\nexit");
    }

    #[test]
    fn helpers_initialise_what_they_write_and_take_bounded_lengths() {
        accepts(
            "ldxdw %r3, [%r1+32]
             jgt %r3, 16, out
             jlt %r3, 8, out
             mov %r1, 0
             mov %r2, %r10
             add %r2, -16
             call 1
             ldxdw %r0, [%r10-16]
             exit
             out:
             mov %r0, 0
             exit",
        );
        // A length that may be 0 initialises nothing for certain.
        let r = check(
            "ldxdw %r3, [%r1+32]\njgt %r3, 16, +7\nmov %r1, 0\nmov %r2, %r10\nadd %r2, -16\ncall 1\nldxdw %r0, [%r10-16]\nexit\nmov %r0, 0\nexit",
        )
        .unwrap_err();
        assert!(matches!(r.reason, Reason::UninitStack { .. }), "{r}");
        // Without the bound the length may reach 1024.
        let r = check(
            "ldxdw %r3, [%r1+32]\nmov %r1, 0\nmov %r2, %r10\nadd %r2, -16\ncall 1\nmov %r0, 0\nexit",
        )
        .unwrap_err();
        assert!(matches!(r.reason, Reason::HelperArg { arg: 2, .. }), "{r}");
    }

    #[test]
    fn impossible_branches_are_not_explored() {
        accepts("mov %r1, 5\nmov %r0, 0\njgt %r1, 10, bad\nexit\nbad:\nldxdw %r0, [%r10-8]\nexit");
    }

    #[test]
    fn worst_case_counts_the_longest_path() {
        // 2 before the loop, 3 per iteration for 10 iterations, then exit.
        let v = accepts(
            "mov %r0, 0
             mov %r1, 0
             l:
             add %r0, %r1
             add %r1, 1
             jlt %r1, 10, l
             exit",
        );
        assert_eq!(v.max_insns, 2 + 3 * 10 + 1);
        // The longer arm of a branch counts.
        let v = accepts(
            "ldxdw %r2, [%r1+32]\nmov %r0, 0\njeq %r2, 0, +3\nadd %r0, 1\nadd %r0, 1\nadd %r0, 1\nexit",
        );
        assert_eq!(v.max_insns, 7);
    }

    #[test]
    fn rejections_name_the_instruction() {
        let r = check("mov %r0, 0\nmov %r0, 1\nldxdw %r0, [%r10-8]\nexit").unwrap_err();
        assert_eq!(r.insn, 2);
        assert!(matches!(r.reason, Reason::UninitStack { off: -8, size: 8 }));
        let r = check("mov %r0, 0\nl:\nja l").unwrap_err();
        assert_eq!((r.insn, r.reason), (1, Reason::Loop));
    }

    #[test]
    fn the_verifier_stops_within_its_budget() {
        let insns = assemble("mov %r0, 0\nl:\nadd %r0, 1\njne %r0, 0, l\nexit").unwrap();
        let small = Budget {
            insns: 10_000,
            ..Budget::default()
        };
        let r = verify(&insns, &[], &Globals { sizes: &[] }, small).unwrap_err();
        assert!(matches!(r.reason, Reason::TooComplex { .. }), "{r}");
        let instant = Budget {
            time: Duration::ZERO,
            ..Budget::default()
        };
        let r = verify(&insns, &[], &Globals { sizes: &[] }, instant).unwrap_err();
        assert!(
            matches!(r.reason, Reason::Timeout | Reason::TooComplex { .. }),
            "{r}"
        );
    }
}
