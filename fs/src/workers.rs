//! The offload workers: threads that verify and compile programs, and run programs when the
//! FUSE workers should not, shared fairly among users.
//!
//! Jobs wait in one queue per user. A free worker takes the next job round-robin over the
//! queues whose user has fewer jobs running than the per-user limit: one user's backlog
//! never holds more than that many workers, and every other user's next job is at most
//! one round away. Each queue holds a bounded number of waiting jobs;
//! past it, submitting fails and the caller gets EAGAIN.
//!
//! A short job is cheaper done by the thread that has it than handed over (a hand-over
//! costs a wake-up on each side, several µs, which is what a B+-tree lookup offloads). So
//! a caller may ask for room to run a job *here* ([`Workers::here`]): granted when the user
//! is under its limit with nothing queued (so order is kept) and fewer than `here` callers
//! are doing the same, which keeps some of the callers' own threads (FUSE workers) free.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Whether a job was run, or refused because its queue was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    Run,
    Refused,
}

/// A job is called once: with `Turn::Run` on a worker, or `Turn::Refused` by `submit`.
pub type Job = Box<dyn FnOnce(Turn) + Send>;

/// Jobs of one user: queued, and running on a worker or here.
#[derive(Default)]
struct State {
    queues: BTreeMap<u32, VecDeque<Job>>,
    running: BTreeMap<u32, u32>,
    /// Jobs running on callers' threads.
    here: u32,
    /// The user served last; the next pick starts after it.
    last: Option<u32>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    /// Most jobs of one user running at once.
    running: u32,
    /// Most jobs of one user waiting.
    waiting: u32,
    /// Most jobs running on callers' threads at once.
    here: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job of user `uid` ended.
    fn done(&self, st: &mut State, uid: u32) {
        if let Some(n) = st.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                st.running.remove(&uid);
            }
        }
        // The user is below its limit again: if it has jobs waiting, a worker can take
        // one. (Only then: waking an idle worker for nothing costs every run done here a
        // context switch.)
        if st.queues.get(&uid).is_some_and(|q| !q.is_empty()) {
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
            .field("running", &self.shared.running)
            .field("waiting", &self.shared.waiting)
            .field("here", &self.shared.here)
            .finish()
    }
}

impl Workers {
    /// Starts `threads` workers. A user may have `running` jobs running and `waiting`
    /// waiting; at most `here` jobs may run on callers' threads at once.
    pub fn new(threads: usize, running: u32, waiting: u32, here: u32) -> Workers {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            running,
            waiting,
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

    /// Queues `job` for user `uid`; if that user's queue is full, calls it with
    /// `Turn::Refused` instead.
    pub fn submit(&self, uid: u32, job: Job) {
        let mut st = self.shared.lock();
        let q = st.queues.entry(uid).or_default();
        if q.len() >= self.shared.waiting as usize {
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
    /// its limit with nothing queued and the callers' share is not used up. The room is
    /// given back when the returned value is dropped.
    pub fn here(&self, uid: u32) -> Option<Here<'_>> {
        let mut st = self.shared.lock();
        let running = st.running.get(&uid).copied().unwrap_or(0);
        let waiting = st.queues.get(&uid).is_some_and(|q| !q.is_empty());
        if st.here >= self.shared.here || running >= self.shared.running || waiting {
            return None;
        }
        st.here += 1;
        *st.running.entry(uid).or_default() += 1;
        Some(Here {
            shared: &self.shared,
            uid,
        })
    }
}

/// Room for one job on the caller's thread (see [`Workers::here`]).
pub struct Here<'a> {
    shared: &'a Shared,
    uid: u32,
}

impl Drop for Here<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.here -= 1;
        self.shared.done(&mut st, self.uid);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.ready.notify_all();
    }
}

/// The next job a worker may take, and its user: round-robin after the user served last,
/// over users below `running` jobs.
fn pick(st: &mut State, running: u32) -> Option<(u32, Job)> {
    let eligible = |st: &State, uid: &u32| {
        st.running.get(uid).copied().unwrap_or(0) < running
            && st.queues.get(uid).is_some_and(|q| !q.is_empty())
    };
    let after = st.last;
    let uid = st
        .queues
        .keys()
        .filter(|k| after.is_none_or(|a| **k > a))
        .chain(st.queues.keys())
        .copied()
        .find(|k| eligible(st, k))?;
    let q = st.queues.get_mut(&uid)?;
    let job = q.pop_front()?;
    if q.is_empty() {
        st.queues.remove(&uid);
    }
    *st.running.entry(uid).or_default() += 1;
    st.last = Some(uid);
    Some((uid, job))
}

fn work(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if let Some((uid, job)) = pick(&mut st, shared.running) {
            drop(st);
            // Jobs catch their own panics and reply; this one keeps the worker alive
            // whatever a job does.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Turn::Run)));
            st = shared.lock();
            shared.done(&mut st, uid);
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
        let workers = Workers::new(1, 2, 4, 2);
        let a = workers.here(1).expect("room");
        let b = workers.here(1).expect("room: the limit is 2");
        assert!(workers.here(1).is_none(), "user 1 is at its limit");
        assert!(workers.here(2).is_none(), "the callers' share is used");
        drop(a);
        let c = workers.here(2).expect("room again");
        drop((b, c));
        // A user with a job queued gets no room here: its jobs keep their order.
        let (tx, rx) = std::sync::mpsc::channel();
        let gate: Job = Box::new(move |_| {
            let _ = rx.recv();
        });
        workers.submit(3, gate);
        workers.submit(3, Box::new(|_| {}));
        assert!(workers.here(3).is_none());
        tx.send(()).unwrap();
    }

    #[test]
    fn users_take_turns_and_limits_hold() {
        let workers = Workers::new(1, 1, 3, 1);
        let (gate_tx, gate_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<(u32, u32)>();
        // The one worker is held until the queues are filled.
        workers.submit(
            9,
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
            workers.submit(uid, job);
        }
        // User 1's queue is full.
        let (refused_tx, refused_rx) = channel();
        workers.submit(1, Box::new(move |turn| refused_tx.send(turn).unwrap()));
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
        let workers = Workers::new(1, 1, 4, 1);
        let (tx, rx) = channel();
        let boom: Job = Box::new(|_| panic!("a job panics"));
        workers.submit(1, boom);
        let ok: Job = Box::new(move |_| tx.send(7).unwrap());
        workers.submit(1, ok);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
    }
}
