//! The offload workers: threads that verify and compile programs, and run programs when the
//! FUSE workers should not, shared fairly among users.
//!
//! Jobs wait in one queue per (user, kind). A free worker takes the next job round-robin
//! over the queues whose user has fewer jobs of that kind running than the kind's limit:
//! one user's backlog never holds more than that many workers, and every other user's
//! next job is at most one round away. Each queue holds a bounded number of waiting jobs;
//! past it, submitting fails and the caller gets EAGAIN.
//!
//! A short job is cheaper done by the thread that has it than handed over (a hand-over
//! costs a wake-up on each side, several µs, which is what a B+-tree lookup offloads). So
//! a caller may ask for room to run a job *here* ([`Workers::here`]): granted when the user
//! is under its limit with nothing queued (so order is kept) and fewer than `here` callers
//! are doing the same, which keeps some of the callers' own threads (FUSE workers) free.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a job does, for the per-user limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Load,
    Run,
}

/// Per user and kind: jobs running at once, and jobs waiting.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub loads: (u32, u32),
    pub runs: (u32, u32),
}

impl Limits {
    fn of(&self, kind: Kind) -> (u32, u32) {
        match kind {
            Kind::Load => self.loads,
            Kind::Run => self.runs,
        }
    }
}

/// Whether a job was run, or refused because its queue was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    Run,
    Refused,
}

/// A job is called once: with `Turn::Run` on a worker, or `Turn::Refused` by `submit`.
pub type Job = Box<dyn FnOnce(Turn) + Send>;

type Key = (u32, Kind);

#[derive(Default)]
struct State {
    queues: BTreeMap<Key, VecDeque<Job>>,
    /// Jobs running, on a worker or here.
    running: BTreeMap<Key, u32>,
    /// Jobs running on callers' threads.
    here: u32,
    /// The queue served last; the next pick starts after it.
    last: Option<Key>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    limits: Limits,
    /// Most jobs running on callers' threads at once.
    here: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job of `key` ended.
    fn done(&self, st: &mut State, key: Key) {
        if let Some(n) = st.running.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                st.running.remove(&key);
            }
        }
        // The user is below its limit again: if it has jobs waiting, a worker can take
        // one. (Only then: waking an idle worker for nothing costs every run done here a
        // context switch.)
        if st.queues.get(&key).is_some_and(|q| !q.is_empty()) {
            self.ready.notify_one();
        }
    }
}

pub struct Workers {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("limits", &self.shared.limits)
            .finish()
    }
}

impl Workers {
    /// Starts `threads` workers; at most `here` jobs may run on callers' threads at once.
    pub fn new(threads: usize, here: u32, limits: Limits) -> Workers {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            limits,
            here,
        });
        for k in 0..threads.max(1) {
            let shared = shared.clone();
            // Compiling a large program takes more stack than a thread's default 2 MiB
            // leaves comfortable; running out would abort the daemon.
            let spawned = std::thread::Builder::new()
                .name(format!("nearfs-offload-{k}"))
                .stack_size(16 << 20)
                .spawn(move || work(&shared));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an offload worker");
            }
        }
        Workers { shared }
    }

    /// Queues `job` for user `uid`; if that user's queue of this kind is full, calls it
    /// with `Turn::Refused` instead.
    pub fn submit(&self, uid: u32, kind: Kind, job: Job) {
        let (_, waiting) = self.shared.limits.of(kind);
        let mut st = self.shared.lock();
        let q = st.queues.entry((uid, kind)).or_default();
        if q.len() >= waiting as usize {
            drop(st);
            return job(Turn::Refused);
        }
        q.push_back(job);
        drop(st);
        self.shared.ready.notify_one();
    }
}

impl Workers {
    /// Room to run a job of user `uid` on the calling thread now, if the user is under
    /// its limit with nothing of this kind queued and the callers' share is not used up.
    /// The room is given back when the returned value is dropped.
    pub fn here(&self, uid: u32, kind: Kind) -> Option<Here<'_>> {
        let key = (uid, kind);
        let mut st = self.shared.lock();
        let running = st.running.get(&key).copied().unwrap_or(0);
        let waiting = st.queues.get(&key).is_some_and(|q| !q.is_empty());
        if st.here >= self.shared.here || running >= self.shared.limits.of(kind).0 || waiting {
            return None;
        }
        st.here += 1;
        *st.running.entry(key).or_default() += 1;
        Some(Here {
            shared: &self.shared,
            key,
        })
    }
}

/// Room for one job on the caller's thread (see [`Workers::here`]).
pub struct Here<'a> {
    shared: &'a Shared,
    key: Key,
}

impl Drop for Here<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.here -= 1;
        self.shared.done(&mut st, self.key);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.ready.notify_all();
    }
}

/// The next job a worker may take, round-robin after the last queue served.
fn pick(st: &mut State, limits: &Limits) -> Option<(Key, Job)> {
    let eligible = |st: &State, key: &Key| {
        let running = st.running.get(key).copied().unwrap_or(0);
        running < limits.of(key.1).0 && st.queues.get(key).is_some_and(|q| !q.is_empty())
    };
    let after = st.last;
    let key = st
        .queues
        .keys()
        .filter(|k| after.is_none_or(|a| **k > a))
        .chain(st.queues.keys())
        .copied()
        .find(|k| eligible(st, k))?;
    let q = st.queues.get_mut(&key)?;
    let job = q.pop_front()?;
    if q.is_empty() {
        st.queues.remove(&key);
    }
    *st.running.entry(key).or_default() += 1;
    st.last = Some(key);
    Some((key, job))
}

fn work(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if let Some((key, job)) = pick(&mut st, &shared.limits) {
            drop(st);
            // Jobs catch their own panics and reply; this one keeps the worker alive
            // whatever a job does.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Turn::Run)));
            st = shared.lock();
            shared.done(&mut st, key);
            continue;
        }
        if st.stop {
            return;
        }
        st = shared.ready.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::time::Duration;

    use super::*;

    #[test]
    fn room_here_respects_the_users_limit_its_queue_and_the_callers_share() {
        let workers = Workers::new(
            1,
            2,
            Limits {
                loads: (1, 4),
                runs: (2, 4),
            },
        );
        let a = workers.here(1, Kind::Run).expect("room");
        let b = workers.here(1, Kind::Run).expect("room: the limit is 2");
        assert!(
            workers.here(1, Kind::Run).is_none(),
            "user 1 is at its limit"
        );
        assert!(
            workers.here(2, Kind::Run).is_none(),
            "the callers' share is used"
        );
        drop(a);
        let c = workers.here(2, Kind::Run).expect("room again");
        drop((b, c));
        // A user with a job queued gets no room here: its jobs keep their order.
        let (tx, rx) = std::sync::mpsc::channel();
        let gate: Job = Box::new(move |_| {
            let _ = rx.recv();
        });
        workers.submit(3, Kind::Load, gate);
        workers.submit(3, Kind::Load, Box::new(|_| {}));
        assert!(workers.here(3, Kind::Load).is_none());
        tx.send(()).unwrap();
    }

    #[test]
    fn users_take_turns_and_limits_hold() {
        let limits = Limits {
            loads: (1, 2),
            runs: (1, 3),
        };
        let workers = Workers::new(1, 1, limits);
        let (gate_tx, gate_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<(u32, u32)>();
        // The one worker is held until the queues are filled.
        workers.submit(
            9,
            Kind::Run,
            Box::new(move |_| {
                let _ = gate_rx.recv();
            }),
        );
        for (uid, n) in [(1u32, 0u32), (1, 1), (1, 2), (2, 0), (2, 1)] {
            let done = done_tx.clone();
            let job: Job = Box::new(move |turn| {
                assert_eq!(turn, Turn::Run);
                done.send((uid, n)).unwrap()
            });
            workers.submit(uid, Kind::Run, job);
        }
        // User 1's queue is full.
        let (refused_tx, refused_rx) = channel();
        workers.submit(
            1,
            Kind::Run,
            Box::new(move |turn| refused_tx.send(turn).unwrap()),
        );
        assert_eq!(refused_rx.try_recv(), Ok(Turn::Refused));
        gate_tx.send(()).unwrap();
        let order: Vec<(u32, u32)> = (0..5)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        // Round-robin between the two users, each in its own order.
        assert_eq!(order, vec![(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]);
    }

    #[test]
    fn a_panicking_job_does_not_take_a_worker() {
        let workers = Workers::new(
            1,
            1,
            Limits {
                loads: (1, 4),
                runs: (1, 4),
            },
        );
        let (tx, rx) = channel();
        let boom: Job = Box::new(|_| panic!("a job panics"));
        workers.submit(1, Kind::Load, boom);
        let ok: Job = Box::new(move |_| tx.send(7).unwrap());
        workers.submit(1, Kind::Load, ok);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
    }
}
