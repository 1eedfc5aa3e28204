//! Programs compiled by clang, verified and run over an in-memory file on both engines.

mod common;

use appcode::{Mode, Program, Request};
use common::{Rng, TestFile, compile_file, progs_dir};
use nearfs_client::layouts::{btree, kv};

const MODES: [Mode; 2] = [Mode::Checked, Mode::Interpreter];

/// Runs `p` over `world` with argument `arg` and default limits.
fn run_with(p: &Program, world: appcode::World<'_>, arg: &[u8]) -> appcode::Outcome {
    p.run(
        world,
        &Request {
            arg,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.name()))
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn load(file: &str, name: &str, mode: Mode) -> Program {
    let obj = compile_file(&progs_dir().join(file), "v3");
    Program::from_elf(&obj, Some(name), mode).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn bytecount_counts_across_hops() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let want = data.iter().filter(|&&b| b == 3).count() as u64;
    let file = TestFile::new(&data);
    for mode in [Mode::Checked, Mode::Interpreter] {
        let p = load("bytecount.c", "bytecount", mode);
        let out = run_with(&p, file.world(false), &[3]);
        assert_eq!(out.result, want, "{mode:?}");
        assert_eq!(out.costs.hops, 2);
        assert_eq!(out.costs.device_bytes, data.len() as u64);
    }
}

#[test]
fn every_example_verifies_on_every_cpu_version() {
    let mut checked = 0;
    for entry in std::fs::read_dir(progs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        for cpu in ["v1", "v2", "v3"] {
            let obj = compile_file(&path, cpu);
            let loaded = appcode::elf::load(&obj).unwrap();
            for prog in &loaded.programs {
                for mode in MODES {
                    Program::from_elf(&obj, Some(&prog.name), mode)
                        .unwrap_or_else(|e| panic!("{} -mcpu={cpu} {mode:?}: {e}", path.display()));
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 6 * 3, "only {checked} programs");
}

#[test]
fn bsearch_finds_present_keys_and_not_absent_ones() {
    let mut rng = Rng(7);
    let mut keys: Vec<u64> = (0..5000).map(|_| rng.below(1 << 40) * 2).collect();
    keys.sort_unstable();
    keys.dedup();
    let file = TestFile::new(&u64s(&keys));
    for mode in MODES {
        let p = load("bsearch.c", "bsearch", mode);
        for probe in 0..200 {
            let (key, want) = if probe % 2 == 0 {
                let i = rng.below(keys.len() as u64) as usize;
                (keys[i], i as i64)
            } else {
                (rng.below(1 << 40) * 2 + 1, -1)
            };
            let out = run_with(&p, file.world(false), &key.to_le_bytes());
            assert_eq!(out.result as i64, want, "{mode:?} key {key}");
        }
    }
}

#[test]
fn btree_lookups_agree_with_a_map_at_every_depth() {
    let mut rng = Rng(11);
    for n in [100usize, 5_000, 300_000] {
        let mut pairs: Vec<(u64, u64)> = (0..n)
            .map(|_| (rng.below(1 << 50), rng.next() >> 1))
            .collect();
        pairs.sort_unstable();
        pairs.dedup_by_key(|p| p.0);
        let (bytes, depth) = btree::build(&pairs, btree::FANOUT);
        let file = TestFile::new(&bytes);
        for mode in MODES {
            let p = load("btree.c", "btree_lookup", mode);
            for probe in 0..100 {
                let (key, want) = if probe % 3 == 2 {
                    (pairs[0].0.wrapping_sub(1) | 1 << 63, -1i64)
                } else {
                    let (k, v) = pairs[rng.below(pairs.len() as u64) as usize];
                    (k, v as i64)
                };
                let out = run_with(&p, file.world(false), &key.to_le_bytes());
                assert_eq!(out.result as i64, want, "{mode:?} n={n} key {key}");
                if want >= 0 {
                    assert_eq!(out.costs.hops as usize, depth - 1);
                }
            }
        }
    }
}

#[test]
fn btree_batch_answers_every_key_as_single_lookups_do() {
    let mut rng = Rng(13);
    let pairs: Vec<(u64, u64)> = (0..20_000u64)
        .map(|i| (i * 10 + 1, rng.below(1 << 60)))
        .collect();
    for fill in [3usize, 40, 255] {
        let (bytes, depth) = btree::build(&pairs, fill);
        let file = TestFile::new(&bytes);
        // Present and absent keys, the most one argument holds (128).
        let keys: Vec<u64> = (0..128)
            .map(|i| match i % 4 {
                3 => rng.below(200_010),
                _ => pairs[rng.below(pairs.len() as u64) as usize].0,
            })
            .collect();
        let read = |n: &mut [u8], at: u64| {
            n.copy_from_slice(&bytes[at as usize..at as usize + n.len()]);
            Ok(())
        };
        let want: Vec<u64> = keys
            .iter()
            .map(|&k| btree::lookup(read, k).unwrap().unwrap_or(u64::MAX))
            .collect();
        for mode in MODES {
            let p = load("btree_batch.c", "btree_batch", mode);
            let out = run_with(&p, file.world(false), &u64s(&keys));
            assert_eq!(out.result, keys.len() as u64, "{mode:?} fill {fill}");
            assert_eq!(
                nearfs_client::layouts::words(&out.output),
                want,
                "{mode:?} fill {fill}"
            );
            // Every key walks from the root: at most `depth` nodes each.
            assert!(out.costs.hops < (keys.len() * depth) as u64);
        }
    }
}

#[test]
fn filter_aggregates_what_a_loop_over_the_records_does() {
    let mut rng = Rng(3);
    let recs: Vec<(u64, u64)> = (0..10_001).map(|i| (i, rng.below(1_000_000))).collect();
    let bytes: Vec<u8> = recs
        .iter()
        .flat_map(|&(k, v)| [k.to_le_bytes(), v.to_le_bytes()])
        .flatten()
        .collect();
    let file = TestFile::new(&bytes);
    let (lo, hi) = (100_000u64, 250_000u64);
    let hits: Vec<u64> = recs
        .iter()
        .map(|r| r.1)
        .filter(|v| (lo..=hi).contains(v))
        .collect();
    let want = [
        hits.len() as u64,
        hits.iter().sum(),
        *hits.iter().min().unwrap(),
        *hits.iter().max().unwrap(),
    ];
    for mode in MODES {
        let p = load("filter.c", "filter", mode);
        let out = run_with(&p, file.world(false), &u64s(&[lo, hi]));
        assert_eq!(out.result, want[0], "{mode:?}");
        assert_eq!(out.output, u64s(&want), "{mode:?}");
    }
}

#[test]
fn kv_increment_checks_the_key_and_writes_only_with_intent() {
    let mut bytes = vec![0u8; 64 * 100];
    for slot in 0..100 {
        bytes[slot * 64..slot * 64 + 56].fill(slot as u8 + 1);
    }
    let file = TestFile::new(&bytes);
    let request = |slot: u64, key: u8| kv::arg(slot, &[key; kv::KEY]);
    let mut counter = 0;
    for mode in MODES {
        let p = load("kv_increment.c", "kv_increment", mode);
        let arg = request(42, 43);
        for _ in 0..3 {
            let out = run_with(&p, file.world(true), &arg);
            counter += 1;
            assert_eq!(out.result, counter, "{mode:?}");
            assert_eq!(out.written, vec![42 * 64 + 56..42 * 64 + 64]);
        }
        let wrong_key = run_with(&p, file.world(true), &request(42, 7));
        assert_eq!(wrong_key.result as i64, -2);
        let read_only = run_with(&p, file.world(false), &arg);
        assert_eq!(read_only.result as i64, -1, "EPERM without write intent");
        assert!(read_only.written.is_empty());
    }
    let mut counter = [0u8; 8];
    blockdev::BlockDevice::read_at(
        &file.device,
        &mut counter,
        file.extents[0].dev_off + 42 * 64 + 56,
    )
    .unwrap();
    assert_eq!(
        u64::from_le_bytes(counter),
        6,
        "three increments on each engine"
    );
}

#[test]
fn substr_emits_every_match_once_across_windows() {
    let mut rng = Rng(5);
    let mut bytes: Vec<u8> = (0..20_000).map(|_| b"ab"[rng.below(2) as usize]).collect();
    // Plant matches across the first window boundaries.
    bytes[4090..4100].copy_from_slice(b"needle-xyz");
    bytes[8180..8190].copy_from_slice(b"needle-xyz");
    let needle = b"needle-x";
    let want: Vec<u64> = (0..=bytes.len() - needle.len())
        .filter(|&i| &bytes[i..i + needle.len()] == needle)
        .map(|i| i as u64)
        .collect();
    let file = TestFile::new(&bytes);
    for mode in MODES {
        let p = load("substr.c", "substr", mode);
        let out = run_with(&p, file.world(false), needle);
        assert_eq!(out.result, want.len() as u64);
        assert_eq!(out.output, u64s(&want), "{mode:?}");
        let aab = run_with(&p, file.world(false), b"ab");
        let count = bytes.windows(2).filter(|w| w == b"ab").count();
        assert_eq!(aab.result as usize, count);
    }
}

#[test]
fn one_program_runs_concurrently_on_many_threads() {
    let mut rng = Rng(13);
    let mut pairs: Vec<(u64, u64)> = (0..50_000)
        .map(|_| (rng.below(1 << 40), rng.next() >> 1))
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    let (bytes, _) = btree::build(&pairs, btree::FANOUT);
    let file = TestFile::new(&bytes);
    for mode in MODES {
        let p = load("btree.c", "btree_lookup", mode);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (p, file, pairs) = (&p, &file, &pairs);
                s.spawn(move || {
                    let mut rng = Rng(100 + t);
                    for _ in 0..200 {
                        let (k, v) = pairs[rng.below(pairs.len() as u64) as usize];
                        let out = run_with(p, file.world(false), &k.to_le_bytes());
                        assert_eq!(out.result, v);
                    }
                });
            }
        });
    }
}

#[test]
fn the_window_shows_nothing_outside_the_runs_range() {
    let data = vec![0xabu8; 3 * 4096];
    let file = TestFile::new(&data);
    // Sums the whole window.
    let sum = appcode::asm::assemble(
        "ldxdw %r2, [%r1]
         mov %r0, 0
         mov %r3, 0
         l:
         mov %r4, %r2
         add %r4, %r3
         ldxb %r5, [%r4]
         add %r0, %r5
         add %r3, 1
         jlt %r3, 4096, l
         exit",
    )
    .unwrap();
    for mode in MODES {
        let p = Program::from_insns("sum", &sum, mode).unwrap();
        let mut world = file.world(false);
        world.range = 100..1100;
        let out = p.run(world, &Request::default()).unwrap();
        assert_eq!(
            out.result,
            1000 * 0xab,
            "{mode:?}: only the range's 1000 bytes"
        );
        assert_eq!(out.costs.device_bytes, 1000);
    }
}

#[test]
fn btree_range_returns_what_walking_the_leaves_with_reads_does() {
    let mut rng = Rng(17);
    let mut pairs: Vec<(u64, u64)> = (0..20_000)
        .map(|_| (rng.below(1 << 30), rng.next()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    let (bytes, _) = btree::build(&pairs, 100);
    let file = TestFile::new(&bytes);
    let read = |buf: &mut [u8], at: u64| {
        buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
        Ok(())
    };
    for mode in MODES {
        let p = load("btree_range.c", "btree_range", mode);
        for (lo, hi) in [
            (0, 1 << 20),
            (1 << 29, (1 << 29) + (1 << 24)),
            (5, 4),
            (1 << 31, u64::MAX),
        ] {
            let want = btree::range(read, lo, hi).unwrap();
            let arg = [lo.to_le_bytes(), hi.to_le_bytes()].concat();
            let out = run_with(&p, file.world(false), &arg);
            let got = nearfs_client::layouts::pairs(&out.output);
            assert_eq!(out.result, want.len() as u64, "{mode:?} [{lo}, {hi}]");
            assert_eq!(got, want, "{mode:?} [{lo}, {hi}]");
        }
    }
}

#[test]
fn minmax_reads_only_blocks_that_can_match() {
    use nearfs_client::layouts::minmax;
    let mut rng = Rng(23);
    // 600 blocks (an index of three windows) of values clustered by block, as a time series.
    let blocks: Vec<Vec<u64>> = (0..600u64)
        .map(|j| {
            (0..300 + j % 200)
                .map(|_| j * 1000 + rng.below(1000))
                .collect()
        })
        .collect();
    let bytes = minmax::build(&blocks);
    let file = TestFile::new(&bytes);
    let read = |buf: &mut [u8], at: u64| {
        buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
        Ok(())
    };
    for mode in MODES {
        let p = load("minmax.c", "minmax", mode);
        for (lo, hi) in [
            (250_500, 260_200),
            (0, u64::MAX),
            (10_000_000, 20_000_000),
            (599_999, 599_999),
        ] {
            let want = minmax::aggregate(read, lo, hi).unwrap();
            let arg = [lo.to_le_bytes(), hi.to_le_bytes()].concat();
            let out = run_with(&p, file.world(false), &arg);
            assert_eq!(out.output, u64s(&want), "{mode:?} [{lo}, {hi}]");
            // Index windows plus the blocks that may match, nothing else.
            let index_windows = (601 * 16usize).div_ceil(4096) as u64;
            assert!(out.costs.device_bytes <= (index_windows + 2 * want[2]) * 4096);
        }
        let narrow = [250_500u64.to_le_bytes(), 260_200u64.to_le_bytes()].concat();
        let out = run_with(&p, file.world(false), &narrow);
        assert!(
            out.costs.device_bytes < bytes.len() as u64 / 20,
            "pruning skipped most blocks"
        );
    }
}
