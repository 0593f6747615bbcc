//! A small team of threads for the decoding loop: every thread runs the same job with its
//! own index, and waiting threads spin briefly before they sleep.
//!
//! Decoding one token runs about a hundred short parallel kernels back to back, each a few
//! tens of microseconds. Handing each to a work-stealing pool costs a sleep and a wake-up
//! per kernel (futex system calls and context switches, measured at 10-15 % of decoding
//! time); a team whose members spin between kernels starts each one in well under a
//! microsecond. Members that find no work for a while park, so an idle team costs nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a member spins for the next job before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    threads: usize,
    /// Incremented once per job; members run the job when it changes.
    epoch: AtomicUsize,
    /// Members (other than the caller) that finished the current job.
    done: AtomicUsize,
    /// Set when a member's part of the job panicked.
    failed: AtomicBool,
    /// Members parked on `wake`.
    sleepers: AtomicUsize,
    /// Serialises callers of `run`.
    caller: Mutex<()>,
    /// The current job, valid while `run` waits for it.
    job: Mutex<Option<JobPtr>>,
    stop: AtomicBool,
    /// Set by `rest`: members park at once instead of spinning.
    rest: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointer is only dereferenced while `Team::run` keeps the job alive.
unsafe impl Send for JobPtr {}

/// A fixed set of threads that run jobs together with the caller.
pub struct Team {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` (the caller counts as one; at least 1).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            threads,
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            caller: Mutex::new(()),
            job: Mutex::new(None),
            stop: AtomicBool::new(false),
            rest: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("smelt-team-{index}"))
                    .spawn(move || member(shared, index))
                    .expect("spawn a team thread")
            })
            .collect();
        Self { shared, handles }
    }

    /// A team as large as rayon's pool (so `RAYON_NUM_THREADS` sizes both).
    pub fn for_pool() -> Self {
        Self::new(rayon::current_num_threads())
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Sends spinning members to sleep now, before the caller hands work to another pool:
    /// spinning threads would take its cores. The next `run` wakes them.
    pub fn rest(&self) {
        self.shared.rest.store(true, Ordering::SeqCst);
    }

    /// Runs `job(index, threads)` on every member, the caller being index 0, and returns when
    /// all have finished.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.threads;
        if n == 1 {
            job(0, 1);
            return;
        }
        let _caller = self.shared.caller.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the lifetime is erased only for the duration of this call: members read the
        // pointer after the epoch changes and report through `done` before we return.
        let ptr: *const Job =
            unsafe { std::mem::transmute(job as *const (dyn Fn(usize, usize) + Sync)) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        self.shared.rest.store(false, Ordering::Relaxed);
        self.shared.done.store(0, Ordering::Relaxed);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        // Wait for the members even if the caller's part panics: they hold a pointer to
        // `job` and to whatever it borrows.
        struct Wait<'a>(&'a Shared, usize);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                while self.0.done.load(Ordering::Acquire) < self.1 - 1 {
                    std::hint::spin_loop();
                }
            }
        }
        let wait = Wait(&self.shared, n);
        job(0, n);
        drop(wait);
        if self.shared.failed.swap(false, Ordering::AcqRel) {
            panic!("a team thread panicked while running a job");
        }
    }
}

fn member(shared: Arc<Shared>, index: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 && (start.elapsed() > SPIN || shared.rest.load(Ordering::Relaxed))
            {
                let guard = shared.park.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                if shared.epoch.load(Ordering::SeqCst) == seen
                    && !shared.stop.load(Ordering::SeqCst)
                {
                    let _unused = shared
                        .wake
                        .wait_timeout(guard, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: `run` keeps the job alive until `done` counts this member.
            let f: &Job = unsafe { &*ptr };
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index, shared.threads)));
            if outcome.is_err() {
                shared.failed.store(true, Ordering::Release);
            }
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The `index`-th of `parts` near-equal contiguous ranges of `0..len`.
pub fn share(len: usize, index: usize, parts: usize) -> std::ops::Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_every_job_once() {
        let team = Team::new(3);
        let hits = AtomicUsize::new(0);
        for round in 0..2000 {
            hits.store(0, Ordering::Relaxed);
            team.run(&|i, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 0x010101, "round {round}");
            if round == 1000 {
                // Long enough for members to park, then wake them again.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn a_panicking_member_fails_the_run_and_the_team_goes_on() {
        let team = Team::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|i, _| {
                if i == 1 {
                    panic!("member fails");
                }
            })
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        team.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn shares_cover_the_range() {
        for len in [0, 1, 7, 100] {
            for parts in 1..5 {
                let total: usize = (0..parts).map(|i| share(len, i, parts).len()).sum();
                assert_eq!(total, len);
                assert_eq!(share(len, parts - 1, parts).end, len);
            }
        }
    }
}
