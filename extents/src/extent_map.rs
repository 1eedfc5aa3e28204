//! A file's extent map: which device blocks hold which file blocks, and the translation of
//! a file range into device ranges.
//!
//! Extents never overlap; neighbours that continue each other on the device and share a
//! state are merged, so a contiguously written file is one extent.

use std::collections::BTreeMap;

use crate::alloc::Run;
use crate::format::Extent;
use crate::types::{DevBlock, FileBlock};

/// What backs one piece of a file range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Nothing: reads as zeros.
    Hole,
    /// Allocated by fallocate, never written: reads as zeros.
    Unwritten(DevBlock),
    /// Data on the device.
    Written(DevBlock),
}

/// A piece of a file range with uniform backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file: FileBlock,
    pub len: u64,
    pub backing: Backing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    dev: u64,
    len: u64,
    unwritten: bool,
}

/// Extents of one file, keyed by first file block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, Mapping>,
}

impl ExtentMap {
    /// Builds a map from stored extents; `None` if they overlap or wrap around.
    pub fn from_extents(extents: &[Extent]) -> Option<Self> {
        let mut m = Self::default();
        for e in extents {
            if e.len == 0 || e.file.0.checked_add(e.len).is_none() {
                return None;
            }
            if m.segments(e.file, e.len)
                .iter()
                .any(|s| s.backing != Backing::Hole)
            {
                return None;
            }
            m.map.insert(
                e.file.0,
                Mapping {
                    dev: e.dev.0,
                    len: e.len,
                    unwritten: e.unwritten,
                },
            );
        }
        Some(m)
    }

    /// The extents in file order.
    pub fn extents(&self) -> Vec<Extent> {
        self.map
            .iter()
            .map(|(&f, m)| Extent {
                file: FileBlock(f),
                dev: DevBlock(m.dev),
                len: m.len,
                unwritten: m.unwritten,
            })
            .collect()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file has no blocks.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Blocks allocated to the file (written or not).
    pub fn allocated_blocks(&self) -> u64 {
        self.map.values().map(|m| m.len).sum()
    }

    /// Translates `[start, start + len)` into segments covering it exactly, in order.
    pub fn segments(&self, start: FileBlock, len: u64) -> Vec<Segment> {
        let end = start.0.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = start.0;
        let first = self
            .map
            .range(..=start.0)
            .next_back()
            .filter(|(f, m)| **f + m.len > start.0)
            .map_or(start.0, |(f, _)| *f);
        for (&f, m) in self.map.range(first..end) {
            if f > pos {
                out.push(Segment {
                    file: FileBlock(pos),
                    len: f - pos,
                    backing: Backing::Hole,
                });
                pos = f;
            }
            let seg_end = (f + m.len).min(end);
            let dev = DevBlock(m.dev + (pos - f));
            let backing = if m.unwritten {
                Backing::Unwritten(dev)
            } else {
                Backing::Written(dev)
            };
            out.push(Segment {
                file: FileBlock(pos),
                len: seg_end - pos,
                backing,
            });
            pos = seg_end;
        }
        if pos < end {
            out.push(Segment {
                file: FileBlock(pos),
                len: end - pos,
                backing: Backing::Hole,
            });
        }
        out
    }

    /// Where to allocate for file block `at` so the file stays contiguous: just after the
    /// device position of the preceding extent, as if the file continued there.
    pub fn goal_for(&self, at: FileBlock) -> Option<DevBlock> {
        let (&f, m) = self.map.range(..at.0).next_back()?;
        Some(DevBlock(m.dev + (at.0 - f)))
    }

    /// Maps a hole `[e.file, e.file + e.len)` to `e.dev`. The range must be a hole.
    pub fn insert(&mut self, e: Extent) {
        debug_assert!(
            self.segments(e.file, e.len)
                .iter()
                .all(|s| s.backing == Backing::Hole)
        );
        self.map.insert(
            e.file.0,
            Mapping {
                dev: e.dev.0,
                len: e.len,
                unwritten: e.unwritten,
            },
        );
        self.merge_around(e.file.0);
    }

    /// Unmaps `[start, start + len)`, returning the device runs it held.
    pub fn remove(&mut self, start: FileBlock, len: u64) -> Vec<Run> {
        let end = start.0.saturating_add(len);
        self.split_at(start.0);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start.0..end).map(|(&f, _)| f).collect();
        keys.into_iter()
            .filter_map(|f| self.map.remove(&f))
            .map(|m| Run {
                start: DevBlock(m.dev),
                len: m.len,
            })
            .collect()
    }

    /// Marks the unwritten parts of `[start, start + len)` as written.
    pub fn mark_written(&mut self, start: FileBlock, len: u64) {
        let end = start.0.saturating_add(len);
        self.split_at(start.0);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start.0..end).map(|(&f, _)| f).collect();
        for f in &keys {
            if let Some(m) = self.map.get_mut(f) {
                m.unwritten = false;
            }
        }
        for f in keys.into_iter().rev() {
            self.merge_around(f);
        }
        self.merge_around(end);
    }

    /// First block at or after `from` holding written data.
    pub fn next_data(&self, from: FileBlock) -> Option<FileBlock> {
        self.segments_from(from)
            .find(|s| matches!(s.backing, Backing::Written(_)))
            .map(|s| s.file)
    }

    /// First block at or after `from` that holds no written data.
    pub fn next_hole(&self, from: FileBlock) -> FileBlock {
        let mut pos = from.0;
        for s in self.segments_from(from) {
            if s.file.0 > pos || !matches!(s.backing, Backing::Written(_)) {
                return FileBlock(pos.max(from.0));
            }
            pos = s.file.0 + s.len;
        }
        FileBlock(pos)
    }

    /// Mapped segments (no holes) starting at or overlapping `from`.
    fn segments_from(&self, from: FileBlock) -> impl Iterator<Item = Segment> + '_ {
        let first = self
            .map
            .range(..=from.0)
            .next_back()
            .filter(|(f, m)| **f + m.len > from.0)
            .map_or(from.0, |(f, _)| *f);
        self.map.range(first..).map(move |(&f, m)| {
            let pos = f.max(from.0);
            let dev = DevBlock(m.dev + (pos - f));
            let backing = if m.unwritten {
                Backing::Unwritten(dev)
            } else {
                Backing::Written(dev)
            };
            Segment {
                file: FileBlock(pos),
                len: f + m.len - pos,
                backing,
            }
        })
    }

    /// Splits the extent containing `at` (if any) so that an extent starts at `at`.
    fn split_at(&mut self, at: u64) {
        let Some((&f, &m)) = self.map.range(..at).next_back() else {
            return;
        };
        if f + m.len <= at {
            return;
        }
        let head = at - f;
        self.map.insert(f, Mapping { len: head, ..m });
        self.map.insert(
            at,
            Mapping {
                dev: m.dev + head,
                len: m.len - head,
                ..m
            },
        );
    }

    /// Merges the extent at `f` with its neighbours where they continue each other.
    fn merge_around(&mut self, f: u64) {
        let mut f = f;
        if let Some((&pf, &pm)) = self.map.range(..f).next_back()
            && let Some(&m) = self.map.get(&f)
            && pf + pm.len == f
            && pm.dev + pm.len == m.dev
            && pm.unwritten == m.unwritten
        {
            self.map.remove(&f);
            self.map.insert(
                pf,
                Mapping {
                    len: pm.len + m.len,
                    ..pm
                },
            );
            f = pf;
        }
        let Some(&m) = self.map.get(&f) else { return };
        let next = f + m.len;
        if let Some(&nm) = self.map.get(&next)
            && m.dev + m.len == nm.dev
            && m.unwritten == nm.unwritten
        {
            self.map.remove(&next);
            self.map.insert(
                f,
                Mapping {
                    len: m.len + nm.len,
                    ..m
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(file: u64, dev: u64, len: u64) -> Extent {
        Extent {
            file: FileBlock(file),
            dev: DevBlock(dev),
            len,
            unwritten: false,
        }
    }

    #[test]
    fn contiguous_inserts_merge_into_one_extent() {
        let mut m = ExtentMap::default();
        m.insert(ext(0, 100, 4));
        m.insert(ext(4, 104, 4));
        m.insert(ext(9, 109, 1));
        assert_eq!(m.len(), 2);
        m.insert(ext(8, 108, 1));
        assert_eq!(m.extents(), vec![ext(0, 100, 10)]);
    }

    #[test]
    fn segments_cover_the_range_with_holes() {
        let mut m = ExtentMap::default();
        m.insert(ext(2, 50, 3));
        let s = m.segments(FileBlock(0), 8);
        assert_eq!(
            s,
            vec![
                Segment {
                    file: FileBlock(0),
                    len: 2,
                    backing: Backing::Hole
                },
                Segment {
                    file: FileBlock(2),
                    len: 3,
                    backing: Backing::Written(DevBlock(50))
                },
                Segment {
                    file: FileBlock(5),
                    len: 3,
                    backing: Backing::Hole
                },
            ]
        );
        let s = m.segments(FileBlock(3), 1);
        assert_eq!(
            s,
            vec![Segment {
                file: FileBlock(3),
                len: 1,
                backing: Backing::Written(DevBlock(51))
            }]
        );
    }

    #[test]
    fn remove_splits_and_returns_device_runs() {
        let mut m = ExtentMap::default();
        m.insert(ext(0, 100, 10));
        let freed = m.remove(FileBlock(3), 4);
        assert_eq!(
            freed,
            vec![Run {
                start: DevBlock(103),
                len: 4
            }]
        );
        assert_eq!(m.extents(), vec![ext(0, 100, 3), ext(7, 107, 3)]);
        assert_eq!(m.allocated_blocks(), 6);
        let freed = m.remove(FileBlock(1), u64::MAX);
        assert_eq!(
            freed,
            vec![
                Run {
                    start: DevBlock(101),
                    len: 2
                },
                Run {
                    start: DevBlock(107),
                    len: 3
                }
            ]
        );
    }

    #[test]
    fn written_parts_of_unwritten_extents_split_then_remerge() {
        let mut m = ExtentMap::default();
        m.insert(Extent {
            unwritten: true,
            ..ext(0, 100, 8)
        });
        m.mark_written(FileBlock(2), 2);
        assert_eq!(m.len(), 3);
        assert_eq!(m.next_data(FileBlock(0)), Some(FileBlock(2)));
        assert_eq!(m.next_hole(FileBlock(2)), FileBlock(4));
        m.mark_written(FileBlock(0), 8);
        assert_eq!(m.extents(), vec![ext(0, 100, 8)]);
    }

    #[test]
    fn overlapping_stored_extents_are_rejected() {
        assert!(ExtentMap::from_extents(&[ext(0, 10, 4), ext(3, 20, 2)]).is_none());
        assert!(ExtentMap::from_extents(&[ext(u64::MAX, 10, 4)]).is_none());
        assert!(ExtentMap::from_extents(&[ext(0, 10, 4), ext(4, 20, 2)]).is_some());
    }
}
