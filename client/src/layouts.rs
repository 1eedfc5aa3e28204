//! File layouts of the appcode examples in `bpf-progs/`, for applications that use them:
//! builders for the data, and the same computations done with ordinary reads (what an
//! application does without offload, and what tests and benchmarks compare against).

use std::io;

/// A small deterministic generator (xorshift64) for data and keys that repeat from run to
/// run; not for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced, since xorshift would stay at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Little-endian `u64`s of `bytes` (a trailing partial word is ignored).
pub fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `{u64, u64}` pairs of `bytes`, as `btree_range.c` emits them.
pub fn pairs(bytes: &[u8]) -> Vec<(u64, u64)> {
    words(bytes).chunks_exact(2).map(|p| (p[0], p[1])).collect()
}

/// `btree.c` and `btree_range.c`: a B+-tree of 4096-byte nodes, root at offset 0. A
/// node is `{u64 leaf; u64 count; u64 keys[255]; u64 vals[255];}`; `leaf` is 0 for an
/// inner node, and for a leaf 1 plus the file offset of the next leaf (0 for none).
pub mod btree {
    use super::*;

    pub const NODE: usize = 4096;
    pub const FANOUT: usize = 255;
    const KEYS: usize = 16;
    const VALS: usize = 16 + 8 * FANOUT;

    /// `leaf`: 0 for an inner node, else 1 | next leaf's offset.
    fn node(leaf: u64, entries: &[(u64, u64)]) -> Vec<u8> {
        let mut n = vec![0u8; NODE];
        n[0..8].copy_from_slice(&leaf.to_le_bytes());
        n[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        for (i, (k, v)) in entries.iter().enumerate() {
            n[KEYS + 8 * i..KEYS + 8 * i + 8].copy_from_slice(&k.to_le_bytes());
            n[VALS + 8 * i..VALS + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        n
    }

    /// The tree over `pairs` (sorted by key, keys distinct), filled to `fill` entries per
    /// node (at most 255), and its depth.
    pub fn build(pairs: &[(u64, u64)], fill: usize) -> (Vec<u8>, usize) {
        let fill = fill.clamp(2, FANOUT);
        // Nodes are made leaves first; child offsets are fixed once the order is known.
        let mut nodes: Vec<(bool, Vec<(u64, u64)>)> = Vec::new();
        let mut level: Vec<(u64, usize)> = Vec::new();
        for chunk in pairs.chunks(fill) {
            nodes.push((true, chunk.to_vec()));
            level.push((chunk[0].0, nodes.len() - 1));
        }
        if level.is_empty() {
            nodes.push((true, Vec::new()));
            level.push((0, 0));
        }
        let mut depth = 1;
        while level.len() > 1 {
            let mut up = Vec::new();
            for chunk in level.chunks(fill) {
                let entries = chunk.iter().map(|&(k, i)| (k, i as u64)).collect();
                nodes.push((false, entries));
                up.push((chunk[0].0, nodes.len() - 1));
            }
            level = up;
            depth += 1;
        }
        // The root goes first, the rest follow in the order they were made.
        let root = level[0].1;
        let order: Vec<usize> = std::iter::once(root)
            .chain((0..nodes.len()).filter(|&i| i != root))
            .collect();
        let mut place = vec![0u64; nodes.len()];
        for (pos, &i) in order.iter().enumerate() {
            place[i] = (pos * NODE) as u64;
        }
        // Leaves were made first, in key order: each links to the one made after it.
        let leaves = nodes.iter().take_while(|(leaf, _)| *leaf).count();
        let mut file = Vec::with_capacity(nodes.len() * NODE);
        for &i in &order {
            let (leaf, entries) = &nodes[i];
            let (word, entries): (u64, Vec<(u64, u64)>) = if *leaf {
                let next = if i + 1 < leaves { place[i + 1] } else { 0 };
                (1 | next, entries.clone())
            } else {
                let children = entries.iter().map(|&(k, c)| (k, place[c as usize]));
                (0, children.collect())
            };
            file.extend(node(word, &entries));
        }
        (file, depth)
    }

    /// The `(key, value)` pairs with `lo <= key <= hi`, as `btree_range.c` emits them:
    /// down to the leaf where `lo` belongs, then along the leaves.
    pub fn range(
        mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
        lo: u64,
        hi: u64,
    ) -> io::Result<Vec<(u64, u64)>> {
        let mut n = vec![0u8; NODE];
        let mut at = 0;
        let mut out = Vec::new();
        for _ in 0..1 << 20 {
            read_at(&mut n, at)?;
            let word = |o: usize| u64::from_le_bytes(n[o..o + 8].try_into().unwrap());
            let (leaf, count) = (word(0), (word(8) as usize).min(FANOUT));
            let key = |i: usize| word(KEYS + 8 * i);
            let val = |i: usize| word(VALS + 8 * i);
            if leaf == 0 {
                let below = (0..count).take_while(|&i| key(i) <= lo).count();
                at = val(below.saturating_sub(1));
                continue;
            }
            for i in 0..count {
                if (lo..=hi).contains(&key(i)) {
                    out.push((key(i), val(i)));
                }
            }
            let next = leaf & !1;
            if count == 0 || key(count - 1) > hi || next == 0 {
                return Ok(out);
            }
            at = next;
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "leaf chain too long",
        ))
    }

    /// The lookup `btree.c` does, with one `read_at` per level; `None` if absent.
    pub fn lookup(
        mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
        key: u64,
    ) -> io::Result<Option<u64>> {
        let mut n = vec![0u8; NODE];
        let mut at = 0;
        for _ in 0..64 {
            read_at(&mut n, at)?;
            let word = |o: usize| u64::from_le_bytes(n[o..o + 8].try_into().unwrap());
            let (leaf, count) = (word(0) != 0, word(8) as usize);
            if count > FANOUT {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "not a node"));
            }
            let below = (0..count)
                .take_while(|&i| word(KEYS + 8 * i) <= key)
                .count();
            if below == 0 {
                return Ok(None);
            }
            let (k, v) = (word(KEYS + 8 * (below - 1)), word(VALS + 8 * (below - 1)));
            if leaf {
                return Ok((k == key).then_some(v));
            }
            at = v;
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "tree too deep"))
    }
}

/// `filter.c`: 16-byte records `{u64 key; u64 value;}`.
pub mod records {
    pub const SIZE: usize = 16;

    pub fn encode(records: &[(u64, u64)]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|&(k, v)| [k.to_le_bytes(), v.to_le_bytes()])
            .flatten()
            .collect()
    }

    /// `[count, sum, min, max]` of the values in `[lo, hi]`, as `filter.c` emits it
    /// (min is `u64::MAX` and max 0 when nothing matches).
    pub fn aggregate(bytes: &[u8], lo: u64, hi: u64) -> [u64; 4] {
        let mut a = [0, 0, u64::MAX, 0];
        for r in bytes.chunks_exact(SIZE) {
            let v = u64::from_le_bytes(r[8..16].try_into().unwrap());
            if (lo..=hi).contains(&v) {
                a[0] += 1;
                a[1] = a[1].wrapping_add(v);
                a[2] = a[2].min(v);
                a[3] = a[3].max(v);
            }
        }
        a
    }

    /// The argument of `filter.c`.
    pub fn arg(lo: u64, hi: u64) -> Vec<u8> {
        [lo.to_le_bytes(), hi.to_le_bytes()].concat()
    }
}

/// `kv_increment.c`: 64-byte records `{u8 key[56]; u64 counter;}`.
pub mod kv {
    pub const SIZE: usize = 64;
    pub const KEY: usize = 56;

    pub fn record(key: &[u8; KEY], counter: u64) -> Vec<u8> {
        [&key[..], &counter.to_le_bytes()].concat()
    }

    /// The argument of `kv_increment.c`: the slot and the key expected there.
    pub fn arg(slot: u64, key: &[u8; KEY]) -> Vec<u8> {
        [&slot.to_le_bytes()[..], &key[..]].concat()
    }

    pub fn counter(record: &[u8]) -> u64 {
        u64::from_le_bytes(record[KEY..SIZE].try_into().unwrap())
    }
}

/// `minmax.c`: data blocks with a min/max index in front.
pub mod minmax {
    use super::*;

    pub const BLOCK: usize = 4096;
    pub const VALUES: usize = 511;

    /// The file for `blocks` (each at most 511 values).
    pub fn build(blocks: &[Vec<u64>]) -> Vec<u8> {
        let entries = blocks.len() + 1;
        let data_off = (entries * 16).div_ceil(BLOCK) * BLOCK;
        let mut file = vec![0u8; data_off + blocks.len() * BLOCK];
        let put =
            |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut file, 0, blocks.len() as u64);
        put(&mut file, 8, data_off as u64);
        for (j, values) in blocks.iter().enumerate() {
            assert!(values.len() <= VALUES);
            let min = values.iter().copied().min().unwrap_or(u64::MAX);
            let max = values.iter().copied().max().unwrap_or(0);
            put(&mut file, 16 * (j + 1), min);
            put(&mut file, 16 * (j + 1) + 8, max);
            let b = data_off + j * BLOCK;
            put(&mut file, b, values.len() as u64);
            for (i, v) in values.iter().enumerate() {
                put(&mut file, b + 8 + 8 * i, *v);
            }
        }
        file
    }

    /// `[count, sum, blocks_read]` as `minmax.c` emits it, with ordinary reads: the
    /// index, then only the blocks that may match.
    pub fn aggregate(
        mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
        lo: u64,
        hi: u64,
    ) -> io::Result<[u64; 3]> {
        let word = |b: &[u8], i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        let mut head = [0u8; 16];
        read_at(&mut head, 0)?;
        let (nblocks, data_off) = (word(&head, 0), word(&head, 1));
        let mut index = vec![0u8; 16 * nblocks as usize];
        read_at(&mut index, 16)?;
        let mut out = [0u64; 3];
        let mut block = vec![0u8; BLOCK];
        for j in 0..nblocks as usize {
            let (min, max) = (word(&index, 2 * j), word(&index, 2 * j + 1));
            if max < lo || min > hi {
                continue;
            }
            read_at(&mut block, data_off + (j * BLOCK) as u64)?;
            let n = (word(&block, 0) as usize).min(VALUES);
            for i in 0..n {
                let v = word(&block, 1 + i);
                if (lo..=hi).contains(&v) {
                    out[0] += 1;
                    out[1] = out[1].wrapping_add(v);
                }
            }
            out[2] += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btree_lookups_by_reads_find_every_key() {
        let pairs: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 3 + 1, i)).collect();
        for fill in [2, 7, 255] {
            let (file, depth) = btree::build(&pairs, fill);
            assert!(depth >= 1);
            let read = |buf: &mut [u8], at: u64| {
                buf.copy_from_slice(&file[at as usize..at as usize + buf.len()]);
                Ok(())
            };
            for &(k, v) in pairs.iter().step_by(97) {
                assert_eq!(btree::lookup(read, k).unwrap(), Some(v));
                assert_eq!(btree::lookup(read, k + 1).unwrap(), None);
            }
            assert_eq!(btree::lookup(read, 0).unwrap(), None);
            let (lo, hi) = (1000, 5000);
            let want: Vec<(u64, u64)> = pairs
                .iter()
                .copied()
                .filter(|&(k, _)| (lo..=hi).contains(&k))
                .collect();
            assert_eq!(btree::range(read, lo, hi).unwrap(), want);
            assert_eq!(btree::range(read, 0, 0).unwrap(), vec![]);
        }
    }
}
