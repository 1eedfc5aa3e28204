//! Free-space allocator for the data region.
//!
//! Free space is a set of disjoint, non-adjacent runs kept twice: by start (to find the run
//! at a goal and to merge neighbours on free) and by (length, start) (best fit). Offload
//! programs walk extents, so the allocator works to keep files in few, large extents:
//! allocation first continues at the caller's goal (the block after the file's last
//! extent), then takes the smallest run that holds the whole request, and only splits a
//! request across runs when no single run can hold it.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::DevBlock;

/// A run of free or allocated blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: DevBlock,
    pub len: u64,
}

/// The free runs of one data region.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    /// First block of the region.
    base: u64,
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    free: u64,
}

/// Requests at least this long, without a free goal, start mid-run (see the module doc).
pub const SPREAD_MIN: u64 = 16;

/// A free of blocks that were not allocated, or an overlap: the caller's metadata is
/// inconsistent and must not be trusted.
#[derive(Debug, PartialEq, Eq)]
pub struct DoubleFree(pub Run);

impl Allocator {
    /// An allocator whose only free run is `[start, start + len)`.
    pub fn new(start: DevBlock, len: u64) -> Self {
        let mut a = Self {
            base: start.0,
            ..Self::default()
        };
        if len > 0 {
            a.insert(start.0, len);
        }
        a
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    /// Number of free runs (a measure of fragmentation).
    pub fn free_runs(&self) -> usize {
        self.by_start.len()
    }

    /// The longest free run, in blocks.
    pub fn largest_run(&self) -> u64 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }

    /// Iterates over the free runs in device order.
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.by_start.iter().map(|(&s, &l)| Run {
            start: DevBlock(s),
            len: l,
        })
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.free += len;
    }

    fn remove(&mut self, start: u64) -> u64 {
        let len = self.by_start.remove(&start).expect("run present");
        self.by_len.remove(&(len, start));
        self.free -= len;
        len
    }

    /// Takes `[at, at + len)` out of the free run starting at `run_start`.
    fn carve(&mut self, run_start: u64, at: u64, len: u64) {
        let run_len = self.remove(run_start);
        if at > run_start {
            self.insert(run_start, at - run_start);
        }
        let tail = run_start + run_len - (at + len);
        if tail > 0 {
            self.insert(at + len, tail);
        }
    }

    /// Allocates `want` blocks, preferring to continue at `goal`. Returns the runs in the
    /// order they should be used; their total is `want`, or empty when fewer than `want`
    /// blocks are free (nothing is allocated then).
    pub fn allocate(&mut self, want: u64, goal: Option<DevBlock>) -> Vec<Run> {
        if want == 0 || want > self.free {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut left = want;
        // 1. Continue exactly at the goal if it is free.
        if let Some(goal) = goal
            && let Some((&s, &l)) = self.by_start.range(..=goal.0).next_back()
            && goal.0 < s + l
        {
            let take = left.min(s + l - goal.0);
            self.carve(s, goal.0, take);
            out.push(Run {
                start: goal,
                len: take,
            });
            left -= take;
        }
        // 2. Spread a file that has nowhere to continue.
        if left == want
            && (goal.is_some() || want >= SPREAD_MIN)
            && let Some(&(len, start)) = self.by_len.last()
            && len >= want
        {
            // A run at the region's base has no file before it that could grow into it.
            let at = if start == self.base {
                start
            } else {
                start + (len / 2).min(len - want)
            };
            self.carve(start, at, want);
            return vec![Run {
                start: DevBlock(at),
                len: want,
            }];
        }
        // 3. Best fit for the rest; 4. otherwise the largest runs first.
        while left > 0 {
            let (len, start) = match self.by_len.range((left, 0)..).next() {
                Some(&fit) => fit,
                None => *self.by_len.last().expect("free > 0 implies a run"),
            };
            let take = left.min(len);
            self.carve(start, start, take);
            out.push(Run {
                start: DevBlock(start),
                len: take,
            });
            left -= take;
        }
        out
    }

    /// Returns a run to the free set, merging with its neighbours.
    pub fn release(&mut self, run: Run) -> Result<(), DoubleFree> {
        let (mut start, mut len) = (run.start.0, run.len);
        if len == 0 {
            return Ok(());
        }
        let end = start.checked_add(len).ok_or(DoubleFree(run))?;
        if let Some((&s, &l)) = self.by_start.range(..end).next_back()
            && s + l > start
        {
            return Err(DoubleFree(run));
        }
        if let Some((&s, &l)) = self.by_start.range(..start).next_back()
            && s + l == start
        {
            self.remove(s);
            start = s;
            len += l;
        }
        if self.by_start.contains_key(&end) {
            len += self.remove(end);
        }
        self.insert(start, len);
        Ok(())
    }

    /// Marks `run` as in use (building the allocator from existing extents at mount).
    pub fn claim(&mut self, run: Run) -> Result<(), DoubleFree> {
        let (s, l) = self
            .by_start
            .range(..=run.start.0)
            .next_back()
            .map(|(&s, &l)| (s, l))
            .ok_or(DoubleFree(run))?;
        let end = run.start.0.checked_add(run.len).ok_or(DoubleFree(run))?;
        if end > s + l {
            return Err(DoubleFree(run));
        }
        self.carve(s, run.start.0, run.len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(s: u64, l: u64) -> Run {
        Run {
            start: DevBlock(s),
            len: l,
        }
    }

    #[test]
    fn continues_at_the_goal_and_merges_on_release() {
        let mut a = Allocator::new(DevBlock(100), 1000);
        assert_eq!(a.allocate(10, None), vec![run(100, 10)]);
        assert_eq!(a.allocate(5, Some(DevBlock(110))), vec![run(110, 5)]);
        assert_eq!(a.free_blocks(), 985);
        a.release(run(100, 10)).unwrap();
        a.release(run(110, 5)).unwrap();
        assert_eq!(a.free_runs(), 1);
        assert_eq!(a.largest_run(), 1000);
    }

    #[test]
    fn small_requests_pack_into_the_best_fit() {
        let mut a = Allocator::new(DevBlock(0), 100);
        a.claim(run(10, 5)).unwrap(); // free: [0,10) [15,100)
        assert_eq!(a.allocate(8, None), vec![run(0, 8)], "best fit");
        assert_eq!(a.allocate(2, None), vec![run(8, 2)]);
    }

    #[test]
    fn new_large_files_start_mid_run_so_neighbours_can_keep_appending() {
        let mut a = Allocator::new(DevBlock(0), 1000);
        let first = a.allocate(16, None);
        assert_eq!(
            first,
            vec![run(0, 16)],
            "nothing precedes the region's start"
        );
        let second = a.allocate(16, None);
        assert_eq!(second, vec![run(16 + 984 / 2, 16)]);
        // Both continue contiguously, interleaved.
        for i in 1..10 {
            assert_eq!(
                a.allocate(16, Some(DevBlock(16 * i))),
                vec![run(16 * i, 16)]
            );
            let g = 508 + 16 * i;
            assert_eq!(a.allocate(16, Some(DevBlock(g))), vec![run(g, 16)]);
        }
        // A file whose goal was taken moves to fresh space instead of filling gaps.
        let moved = a.allocate(16, Some(DevBlock(20)));
        assert_eq!(moved.len(), 1);
        assert!(moved[0].start.0 > 160 && moved[0].start.0 != 508 + 160);
    }

    #[test]
    fn splits_only_when_nothing_fits_and_refuses_overcommit() {
        let mut a = Allocator::new(DevBlock(0), 30);
        a.claim(run(10, 10)).unwrap();
        assert!(a.allocate(21, None).is_empty());
        assert_eq!(a.free_blocks(), 20);
        let got = a.allocate(20, None);
        assert_eq!(got.iter().map(|r| r.len).sum::<u64>(), 20);
        assert_eq!(a.free_blocks(), 0);
    }

    #[test]
    fn double_free_and_double_claim_are_detected() {
        let mut a = Allocator::new(DevBlock(0), 30);
        assert_eq!(a.release(run(5, 2)), Err(DoubleFree(run(5, 2))));
        a.claim(run(0, 10)).unwrap();
        assert!(a.claim(run(5, 2)).is_err());
        assert!(a.release(run(u64::MAX, 2)).is_err());
    }

    proptest! {
        /// Whatever the sequence, allocated runs never overlap each other or free space,
        /// and freeing everything restores one run.
        #[test]
        fn never_hands_out_a_block_twice(ops in prop::collection::vec((1u64..40, any::<bool>(), any::<u8>()), 1..200)) {
            let mut a = Allocator::new(DevBlock(50), 500);
            let mut held: Vec<Run> = Vec::new();
            for (n, free, pick) in ops {
                if free && !held.is_empty() {
                    let r = held.swap_remove(pick as usize % held.len());
                    a.release(r).unwrap();
                } else {
                    let goal = held.last().map(|r| DevBlock(r.start.0 + r.len));
                    held.extend(a.allocate(n, goal));
                }
                let mut blocks: Vec<u64> = held.iter().flat_map(|r| r.start.0..r.start.0 + r.len).collect();
                blocks.extend(a.runs().flat_map(|r| r.start.0..r.start.0 + r.len));
                blocks.sort_unstable();
                let total = blocks.len();
                blocks.dedup();
                prop_assert_eq!(blocks.len(), total, "a block is held twice");
                prop_assert_eq!(total, 500);
            }
            for r in held { a.release(r).unwrap(); }
            prop_assert_eq!(a.free_runs(), 1);
        }
    }
}
