//! The numeric domain: sets of 64-bit values as an unsigned and a signed interval that
//! refine each other (the Linux verifier's `umin/umax/smin/smax`), with widening.

/// A set of 64-bit values: those inside both intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub umin: u64,
    pub umax: u64,
    pub smin: i64,
    pub smax: i64,
}

impl Range {
    pub const UNKNOWN: Range = Range {
        umin: 0,
        umax: u64::MAX,
        smin: i64::MIN,
        smax: i64::MAX,
    };

    pub fn konst(v: u64) -> Range {
        Range {
            umin: v,
            umax: v,
            smin: v as i64,
            smax: v as i64,
        }
    }

    pub fn unsigned(umin: u64, umax: u64) -> Option<Range> {
        Range {
            umin,
            umax,
            ..Range::UNKNOWN
        }
        .sync()
    }

    pub fn signed(smin: i64, smax: i64) -> Option<Range> {
        Range {
            smin,
            smax,
            ..Range::UNKNOWN
        }
        .sync()
    }

    /// Values of `bytes` bytes, zero-extended.
    pub fn width(bytes: u32) -> Range {
        match bytes {
            8 => Range::UNKNOWN,
            n => Range::unsigned(0, (1u64 << (8 * n)) - 1).expect("a nonempty interval"),
        }
    }

    pub fn constant(&self) -> Option<u64> {
        (self.umin == self.umax).then_some(self.umin)
    }

    /// Whether `v` is in the set.
    pub fn has(&self, v: u64) -> bool {
        self.umin <= v && v <= self.umax && self.smin <= v as i64 && v as i64 <= self.smax
    }

    pub fn contains(&self, other: &Range) -> bool {
        self.umin <= other.umin
            && other.umax <= self.umax
            && self.smin <= other.smin
            && other.smax <= self.smax
    }

    /// Whether every value, read as signed, lies in `[-bound, bound]`.
    pub fn within(&self, bound: i64) -> bool {
        self.smin >= -bound && self.smax <= bound
    }

    /// Tightens each interval with what the other implies; `None` if no value is left.
    pub fn sync(mut self) -> Option<Range> {
        for _ in 0..2 {
            // Unsigned bounds on one side of the sign boundary are signed bounds too.
            if self.umax <= i64::MAX as u64 || self.umin > i64::MAX as u64 {
                self.smin = self.smin.max(self.umin as i64);
                self.smax = self.smax.min(self.umax as i64);
            }
            if self.smin >= 0 || self.smax < 0 {
                self.umin = self.umin.max(self.smin as u64);
                self.umax = self.umax.min(self.smax as u64);
            }
        }
        (self.umin <= self.umax && self.smin <= self.smax).then_some(self)
    }

    /// The low 32 bits, zero-extended: exact when every value fits.
    pub fn low32(&self) -> Range {
        if let Some(v) = self.constant() {
            Range::konst(v as u32 as u64)
        } else if self.umax <= u32::MAX as u64 {
            *self
        } else {
            Range::width(4)
        }
    }

    /// Whether the set may include zero.
    pub fn may_be_zero(&self) -> bool {
        self.umin == 0
    }

    pub fn union(&self, o: &Range) -> Range {
        Range {
            umin: self.umin.min(o.umin),
            umax: self.umax.max(o.umax),
            smin: self.smin.min(o.smin),
            smax: self.smax.max(o.smax),
        }
    }

    /// Values in both; `None` if there are none.
    pub fn meet(&self, o: &Range) -> Option<Range> {
        Range {
            umin: self.umin.max(o.umin),
            umax: self.umax.min(o.umax),
            smin: self.smin.max(o.smin),
            smax: self.smax.min(o.smax),
        }
        .sync()
    }
}

/// Bounds that widening jumps to: the program's constants and the powers of two, so that
/// a joined range grows in a few steps and stops at a limit the program tests.
pub struct Thresholds {
    unsigned: Vec<u64>,
    signed: Vec<i64>,
}

impl Thresholds {
    pub fn new(constants: impl IntoIterator<Item = u64>) -> Thresholds {
        let mut unsigned: Vec<u64> = constants
            .into_iter()
            .flat_map(|c| [c.wrapping_sub(1), c, c.wrapping_add(1)])
            .chain((0..64).flat_map(|k| [1u64 << k, (1u64 << k) - 1]))
            .chain([0, u64::MAX, i64::MAX as u64, 1 << 63])
            .collect();
        unsigned.sort_unstable();
        unsigned.dedup();
        let mut signed: Vec<i64> = unsigned
            .iter()
            .map(|&u| u as i64)
            .flat_map(|v| [v, v.wrapping_neg()])
            .chain([i64::MIN, i64::MAX])
            .collect();
        signed.sort_unstable();
        signed.dedup();
        Thresholds { unsigned, signed }
    }

    /// The union of `old` and `new`, with each bound that `new` pushes out moved on to
    /// the next threshold.
    pub fn widen(&self, old: &Range, new: &Range) -> Range {
        fn up<T: Ord + Copy>(ts: &[T], x: T, max: T) -> T {
            ts.get(ts.partition_point(|&t| t < x))
                .copied()
                .unwrap_or(max)
        }
        fn down<T: Ord + Copy>(ts: &[T], x: T, min: T) -> T {
            ts.partition_point(|&t| t <= x)
                .checked_sub(1)
                .map_or(min, |i| ts[i])
        }
        let u = &self.unsigned;
        let s = &self.signed;
        let r = Range {
            umin: if new.umin < old.umin {
                down(u, new.umin, 0)
            } else {
                old.umin
            },
            umax: if new.umax > old.umax {
                up(u, new.umax, u64::MAX)
            } else {
                old.umax
            },
            smin: if new.smin < old.smin {
                down(s, new.smin, i64::MIN)
            } else {
                old.smin
            },
            smax: if new.smax > old.smax {
                up(s, new.smax, i64::MAX)
            } else {
                old.smax
            },
        };
        r.sync().unwrap_or(Range::UNKNOWN)
    }
}

/// Random ranges and values inside them, for the property tests of every transfer
/// function.
#[cfg(test)]
pub mod arb {
    use proptest::prelude::*;

    use super::Range;

    /// Values that stress the boundaries: small, around 2^31, 2^32, 2^63 and the top.
    pub fn value() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..16,
            any::<u64>(),
            (0u64..64).prop_map(|k| 1u64 << k),
            (0u64..64, -3i64..3).prop_map(|(k, d)| (1u64 << k).wrapping_add(d as u64)),
            (0u64..256).prop_map(|d| u64::MAX - d),
            (0u64..1 << 12),
        ]
    }

    /// A range and a value in it: the range around two values, sometimes a constant,
    /// sometimes tightened on the signed side.
    pub fn range_with_value() -> impl Strategy<Value = (Range, u64)> {
        (value(), value(), value(), any::<u8>()).prop_filter_map("nonempty", |(a, b, v, k)| {
            let (lo, hi) = (a.min(b), a.max(b));
            let r = match k % 4 {
                0 => Range::konst(a),
                1 => Range::unsigned(lo, hi)?,
                2 => {
                    let (s, t) = ((a as i64).min(b as i64), (a as i64).max(b as i64));
                    Range::signed(s, t)?
                }
                _ => Range::UNKNOWN,
            };
            // A value inside: v itself if it is, else one of the bounds.
            let v = [v, r.umin, r.umax, r.smin as u64, r.smax as u64]
                .into_iter()
                .find(|&x| r.has(x))?;
            Some((r, v))
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sync_moves_bounds_between_signed_and_unsigned() {
        let r = Range::signed(0, 10).unwrap();
        assert_eq!((r.umin, r.umax), (0, 10));
        let neg = Range::signed(-5, -1).unwrap();
        assert_eq!(neg.umin, (-5i64) as u64);
        assert!(Range::unsigned(5, 4).is_none());
    }

    proptest! {
        #[test]
        fn sync_keeps_every_value((r, v) in arb::range_with_value()) {
            let s = r.sync().expect("a range with a value is not empty");
            prop_assert!(s.has(v));
        }

        #[test]
        fn union_meet_and_widen_keep_their_values(
            (a, x) in arb::range_with_value(),
            (b, y) in arb::range_with_value(),
            k in any::<u64>(),
        ) {
            let u = a.union(&b);
            prop_assert!(u.has(x) && u.has(y));
            let t = Thresholds::new([k, 4096]);
            let w = t.widen(&a, &b);
            prop_assert!(w.has(x) && w.has(y));
            if b.has(x) {
                prop_assert!(a.meet(&b).is_some_and(|m| m.has(x)));
            }
            prop_assert!(a.low32().has(x as u32 as u64));
        }
    }
}
