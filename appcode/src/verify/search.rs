//! The search: paths explored over abstract states, pruned where a state already seen at a
//! merge point covers the new one, with loops followed iteration by iteration and the
//! longest path from every state to an exit kept as the worst-case cost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasherDefault;
use std::time::Instant;

use super::range::Thresholds;
use super::state::{FP, FastHasher, FastMap, State};
use super::transfer::{self, Env, Flow};
use super::{Budget, Reason, Rejection};
use crate::insn::Insn;

/// A state at a jump target and the paths that reach it. Nodes form a DAG: a node
/// reached by several paths (merged, or pruned into before it finished) has several
/// parents.
pub(super) struct Node {
    /// (parent, instructions from the parent's start to this node).
    pub parents: Vec<(u32, u64)>,
    pub pc: usize,
    /// Back-edges taken on the way here: a loop iteration count.
    pub iter: u32,
    /// Children and prunes into unfinished nodes this node waits for.
    pub pending: u32,
    pub walked: bool,
    pub done: bool,
    /// Longest path from here to an exit.
    pub cost: u64,
}

pub(super) struct Explorer<'p> {
    pub insns: &'p [Insn],
    pub env: Env<'p>,
    pub live: Vec<u16>,
    pub demanded: Vec<u16>,
    /// Whether two or more edges enter a slot: only there can paths meet, so only there
    /// are states kept and compared (every loop passes through one).
    pub merge: Vec<bool>,
    pub prune: Vec<bool>,
    pub nodes: Vec<Node>,
    /// The state each node started in, kept for pruning.
    pub states: Vec<Option<State>>,
    /// Nodes by (slot, hash of state), for exact matches.
    pub seen: FastMap<(usize, u64), Vec<u32>>,
    /// The latest nodes at each slot, for coverage by a wider state.
    pub recent: Vec<Vec<u32>>,
    pub visits: Vec<u32>,
    /// Nodes to walk, fewest loop iterations first, then in instruction order: paths of
    /// one iteration meet at their merge points before either goes on, so they are
    /// joined once instead of each exploring the rest of the loop.
    pub work: BinaryHeap<Reverse<(u32, usize, u32)>>,
    pub processed: u64,
    pub budget: Budget,
    pub start: Instant,
    /// Slots some path executed.
    pub reached: Vec<bool>,
    /// Bytes of the states kept, about.
    pub kept: usize,
    pub thresholds: Thresholds,
    /// Joins so far by point and state shape (see `State::shape_hash`).
    pub joins: FastMap<(usize, u64), u32>,
}

const RECENT: usize = 16;
/// Pending states of one iteration at one point before their constants are joined.
const CROWD: usize = 4;
/// Joins at one point before ranges are widened.
const WIDEN_AFTER: u32 = 8;

impl Explorer<'_> {
    /// Runs node `n`'s path from `pc` to its next jump target, branch or exit.
    pub fn walk(&mut self, n: u32) -> Result<(), Rejection> {
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
            if self.processed > self.budget.insns
                || self.nodes.len() > self.budget.states
                || self.kept > self.budget.memory
            {
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
            self.reached[pc] = true;
            if self.insns[pc].is_lddw() {
                self.reached[pc + 1] = true;
            }
            let flow = transfer::step(&mut self.env, self.insns, &mut state, pc)
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
        self.kept += state.bytes();
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
}
