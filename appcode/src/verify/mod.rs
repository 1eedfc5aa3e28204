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
//!
//! What it assumes is made true by construction elsewhere: the stack is zeroed before
//! every invocation, helpers zero what they write before they can fail, code it never
//! reached is replaced by traps ([`sanitize`]), and the engine checks every access against
//! the region recorded here ([`Target`]) — so that a verifier bug can fail a run but not
//! reach the daemon (docs/security.md).

mod dataflow;
mod range;
mod reason;
mod search;
mod state;
mod structure;
pub mod transfer;
pub mod value;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::abi::{self, STACK_SIZE};
use crate::elf::DataRef;
use crate::insn::{Insn, class, jmp};
pub use range::Range;
use range::Thresholds;
pub use reason::{Reason, Rejection};
use search::{Explorer, Node};
use state::{FP, FastMap, State};
use transfer::{Env, ptr};
use value::{Link, Region, Value};

/// Most instruction slots the verifier accepts: what the checked engine was shown to
/// compile and run (`tests/hostile.rs`).
pub const MAX_INSNS: usize = crate::elf::MAX_INSNS;

/// How far a pointer may be moved from the start of its region, either way: far less than
/// the distance from any region's guest address to 0 or 2^63 ([`crate::memory`]), so that no
/// address computed from a pointer wraps. Linux's verifier uses the same bound.
pub const MAX_OFFSET: i64 = 1 << 29;

/// The helper id of the trap that replaces code the verifier never reached ([`sanitize`]).
/// No program may call it: it is not in the helper table.
pub const TRAP_HELPER: i32 = 0x7fff_0bad;

/// Bounds on the verifier's own work.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Instructions processed over all paths.
    pub insns: u64,
    /// States kept for pruning.
    pub states: usize,
    /// Bytes those states may take, about.
    pub memory: usize,
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            insns: 1_000_000,
            states: 100_000,
            memory: 128 << 20,
            time: Duration::from_secs(2),
        }
    }
}

/// Which of the verifier's checks are in force. All of them, always, except in tests that
/// show that the engine's run-time checks hold on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// Bounds, permissions and pointer offsets of every access and helper argument. Off,
    /// the verifier accepts any access it cannot place, and only the engine stands.
    pub memory: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks { memory: true }
    }
}

/// What the verifier saw one memory instruction reach, over every path it explored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// No path reached the instruction.
    Unreached,
    /// Always one region: the engine checks the access against that region's bounds.
    One(Region),
    /// Several regions, or none the verifier could name: the engine checks every area.
    Many,
}

/// What the verifier learnt about an accepted program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Most instructions one invocation can execute.
    pub max_insns: u64,
    /// Instructions the verifier processed.
    pub processed: u64,
    /// States it kept.
    pub states: usize,
    /// Bytes of stack the program uses.
    pub stack: usize,
    /// Slots some path executed; the rest become traps ([`sanitize`]).
    pub reached: Vec<bool>,
    /// Per slot, what its memory access reached (for the engine's checks).
    pub targets: Vec<Target>,
}

/// What the verifier needs to know about the program's globals: sizes of the read-only
/// sections, by global id.
pub struct Globals<'a> {
    pub sizes: &'a [usize],
}

/// `insns` with every slot the verifier never reached replaced by a call of
/// [`TRAP_HELPER`] (Linux's `sanitize_dead_code`): code the verifier did not see cannot run
/// on any engine. The slot count is unchanged.
pub fn sanitize(insns: &[Insn], verified: &Verified) -> Vec<Insn> {
    let trap = Insn::new(class::JMP | jmp::CALL, 0, 0, 0, TRAP_HELPER);
    insns
        .iter()
        .zip(&verified.reached)
        .map(|(i, &seen)| if seen { *i } else { trap })
        .collect()
}

/// Verifies a program without local calls (see [`crate::inline`]).
pub fn verify(
    insns: &[Insn],
    refs: &[DataRef],
    globals: &Globals<'_>,
    budget: Budget,
    checks: Checks,
) -> Result<Verified, Rejection> {
    let reject = |insn: usize, reason: Reason| Rejection { insn, reason };
    let shape = structure::check(insns, refs).map_err(|(i, r)| reject(i, r))?;
    let flow = dataflow::Flow::new(insns);
    let mut x = Explorer {
        insns,
        env: Env {
            globals: globals.sizes,
            checks,
            refs: shape.refs,
            next_id: 0,
            stack_used: 0,
            targets: vec![Target::Unreached; insns.len()],
        },
        live: flow.live(),
        demanded: flow.demanded(),
        merge: flow.merges(),
        prune: shape.starts,
        nodes: Vec::new(),
        states: Vec::new(),
        seen: FastMap::default(),
        recent: vec![Vec::new(); insns.len()],
        visits: vec![0; insns.len()],
        work: BinaryHeap::new(),
        processed: 0,
        budget,
        start: Instant::now(),
        reached: vec![false; insns.len()],
        kept: 0,
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
        stack: x.env.stack_used,
        reached: x.reached,
        targets: x.env.targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;

    fn check(text: &str) -> Result<Verified, Rejection> {
        let insns = assemble(text).unwrap();
        verify(
            &insns,
            &[],
            &Globals { sizes: &[] },
            Budget::default(),
            Checks::default(),
        )
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
        let r = verify(
            &insns,
            &[],
            &Globals { sizes: &[] },
            small,
            Checks::default(),
        )
        .unwrap_err();
        assert!(matches!(r.reason, Reason::TooComplex { .. }), "{r}");
        // States that each carry a full stack, at one merge point after another, stop at
        // the memory budget, whatever the state count.
        let mut text = String::new();
        for k in 1..=64 {
            text.push_str(&format!("stdw [%r10-{}], {k}\n", 8 * k));
        }
        text.push_str("ldxdw %r1, [%r1+40]\nmov %r2, 0\n");
        for k in 0..400 {
            text.push_str(&format!("jeq %r1, {k}, +1\nmov %r2, {k}\n"));
        }
        text.push_str("mov %r0, %r2\nexit");
        let stacked = assemble(&text).unwrap();
        let tight = Budget {
            memory: 1 << 20,
            ..Budget::default()
        };
        let r = verify(
            &stacked,
            &[],
            &Globals { sizes: &[] },
            tight,
            Checks::default(),
        );
        assert!(
            matches!(
                r,
                Err(Rejection {
                    reason: Reason::TooComplex { .. },
                    ..
                })
            ),
            "{r:?}"
        );
        let ok = verify(
            &stacked,
            &[],
            &Globals { sizes: &[] },
            Budget::default(),
            Checks::default(),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let instant = Budget {
            time: Duration::ZERO,
            ..Budget::default()
        };
        let r = verify(
            &insns,
            &[],
            &Globals { sizes: &[] },
            instant,
            Checks::default(),
        )
        .unwrap_err();
        assert!(
            matches!(r.reason, Reason::Timeout | Reason::TooComplex { .. }),
            "{r}"
        );
    }
}
