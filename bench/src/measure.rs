//! Timing: operations repeated on several threads for a fixed time, summarised as median
//! and 99th-percentile latency and operations per second.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// What one measurement found.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub median_us: f64,
    pub p99_us: f64,
    /// Operations per second over all threads.
    pub ops_per_sec: f64,
    /// Timed operations (each thread's first one is a warm-up, counted in `ops` only).
    pub samples: usize,
    /// Every operation done, warm-ups included.
    pub ops: u64,
}

impl Stats {
    /// The same measurement per item, for operations that each did `items` of something:
    /// latencies divided, throughput multiplied.
    pub fn per_item(self, items: usize) -> Stats {
        let k = items as f64;
        Stats {
            median_us: self.median_us / k,
            p99_us: self.p99_us / k,
            ops_per_sec: self.ops_per_sec * k,
            ..self
        }
    }
}

/// Runs `op` on `threads` threads at once for `time`, each with its own state from
/// `setup(thread index)`. The first error stops the measurement and is returned.
pub fn threads<S>(
    threads: usize,
    time: Duration,
    setup: impl Fn(usize) -> Result<S> + Sync,
    op: impl Fn(&mut S) -> Result<()> + Sync,
) -> Result<Stats> {
    let start = Barrier::new(threads);
    let per_thread: Vec<Result<(Vec<Duration>, Duration)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (start, setup, op) = (&start, &setup, &op);
                s.spawn(move || -> Result<(Vec<Duration>, Duration)> {
                    let state = setup(t);
                    start.wait();
                    let mut state = state?;
                    op(&mut state)?;
                    let mut lat = Vec::new();
                    let begin = Instant::now();
                    while begin.elapsed() < time {
                        let t = Instant::now();
                        op(&mut state)?;
                        lat.push(t.elapsed());
                    }
                    Ok((lat, begin.elapsed()))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a benchmark thread panicked"))
            .collect()
    });
    let mut all = Vec::new();
    let mut wall = Duration::ZERO;
    for r in per_thread {
        let (lat, elapsed) = r?;
        all.extend(lat);
        wall = wall.max(elapsed);
    }
    Ok(summarise(all, wall, threads as u64))
}

/// Runs each of `ops` in turn, over and over for `time` on this thread, and summarises
/// each one's times: what the host does meanwhile falls on all of them alike, so their
/// ratios hold even when the machine is noisy.
pub fn alternating(
    time: Duration,
    ops: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Stats>> {
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); ops.len()];
    for op in ops.iter_mut() {
        op()?;
    }
    let begin = Instant::now();
    while begin.elapsed() < time {
        for (op, lat) in ops.iter_mut().zip(&mut lat) {
            let t = Instant::now();
            op()?;
            lat.push(t.elapsed());
        }
    }
    let wall = begin.elapsed();
    Ok(lat
        .into_iter()
        .map(|l| summarise(l, wall / ops.len() as u32, 1))
        .collect())
}

/// Runs `op` `times` times in a row (after one warm-up) and summarises the times.
pub fn repeat(times: usize, mut op: impl FnMut() -> Result<()>) -> Result<Stats> {
    op()?;
    let mut lat = Vec::with_capacity(times);
    let begin = Instant::now();
    for _ in 0..times {
        let t = Instant::now();
        op()?;
        lat.push(t.elapsed());
    }
    Ok(summarise(lat, begin.elapsed(), 1))
}

/// Median, 99th percentile and rate of `lat`, operations timed over `wall` (plus `warmups`
/// untimed ones in `ops`).
pub fn summarise(mut lat: Vec<Duration>, wall: Duration, warmups: u64) -> Stats {
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)));
    Stats {
        median_us: at(0.5).map_or(0.0, |&d| us(d)),
        p99_us: at(0.99).map_or(0.0, |&d| us(d)),
        ops_per_sec: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
        samples: lat.len(),
        ops: lat.len() as u64 + warmups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_median_and_tail_of_the_samples() {
        let lat: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let s = summarise(lat, Duration::from_millis(10), 2);
        assert_eq!(s.median_us, 51.0);
        assert_eq!(s.p99_us, 100.0);
        assert_eq!(s.samples, 100);
        assert_eq!(s.ops, 102);
        assert!((s.ops_per_sec - 10_000.0).abs() < 1e-6);
    }

    #[test]
    fn threads_count_every_operation_and_pass_errors_on() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let done = AtomicU64::new(0);
        let s = threads(3, Duration::from_millis(20), Ok, |_| {
            done.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(s.ops, done.load(Ordering::Relaxed));
        let err = threads(2, Duration::from_millis(20), Ok, |&mut t| {
            if t == 1 {
                anyhow::bail!("thread 1 fails")
            } else {
                Ok(())
            }
        });
        assert!(err.unwrap_err().to_string().contains("thread 1 fails"));
    }
}
