//! A persistent pool of helper threads for the CPU GEMM.
//!
//! Why not spawn per call: at M = 1 a whole 4096x4096 layer takes a few
//! hundred microseconds, and spawning plus joining threads costs a visible share
//! of that. Why the caller works too: it is already running, so a call never
//! waits for a helper to wake up before work starts; helpers join as they come.
//! Tasks are claimed from one shared atomic counter, so a slow or descheduled
//! thread (VMs do that) only delays the tasks it holds. Which thread runs a task
//! never changes what the task computes, so results do not depend on threads.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling before it sleeps: long enough to catch
/// the next call of a layer-by-layer loop, short enough not to steal a core
/// from the caller's Python thread for long.
const SPIN: Duration = Duration::from_micros(200);
/// Polls between clock reads while spinning (reading the clock every poll cost a few % of a core).
const POLLS_PER_CLOCK_READ: u32 = 256;

/// Threads the GEMM uses: `OPT4GPTQ_NUM_THREADS` (read once) if set, else every
/// available core. A value above the core count is honoured, which lets tests
/// check thread-count invariance with more threads than this machine has.
pub fn thread_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        match std::env::var("OPT4GPTQ_NUM_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(count) if count >= 1 => count,
            _ => available,
        }
    })
}

/// One parallel call: `tasks` indices handed out through `next`.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    /// Helpers that picked this job up and have not let go of it yet.
    active: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= self.tasks {
                return;
            }
            (self.run)(task);
        }
    }
}

/// A job pointer published to helpers; the caller keeps the job alive until no helper holds it.
#[derive(Clone, Copy)]
struct JobRef(*const Job<'static>);
unsafe impl Send for JobRef {}

struct Slot {
    job: Option<JobRef>,
    generation: u64,
}

struct Pool {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Mirrors slot.generation so spinning helpers need not take the lock.
    generation: AtomicU64,
    /// One call at a time owns the helpers; a concurrent caller runs alone.
    busy: Mutex<()>,
    /// The process that started the helpers. A child made by fork() has none
    /// of them, and may hold copies of locks a helper held at the fork, so it
    /// runs every call on its own thread instead of touching the pool.
    owner_process: u32,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            slot: Mutex::new(Slot { job: None, generation: 0 }),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            busy: Mutex::new(()),
            owner_process: std::process::id(),
        }));
        for i in 1..thread_count() {
            std::thread::Builder::new()
                .name(format!("opt4gptq-cpu-{i}"))
                .spawn(move || helper(pool))
                .expect("cannot start an opt4gptq CPU helper thread");
        }
        pool
    })
}

fn helper(pool: &'static Pool) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        'spin: while start.elapsed() < SPIN {
            for _ in 0..POLLS_PER_CLOCK_READ {
                if pool.generation.load(Ordering::Acquire) != seen {
                    break 'spin;
                }
                std::hint::spin_loop();
            }
        }
        let job = {
            let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
            while slot.generation == seen {
                slot = pool.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            seen = slot.generation;
            let job = slot.job;
            if let Some(JobRef(job)) = job {
                // Registered under the lock: the caller cannot retire the job before this is visible.
                unsafe { (*job).active.fetch_add(1, Ordering::AcqRel) };
            }
            job
        };
        if let Some(JobRef(job)) = job {
            let job = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| job.work())).is_err() {
                job.panicked.store(true, Ordering::Release);
                // Stop the other threads from claiming more of a failed call.
                job.next.store(usize::MAX / 2, Ordering::Relaxed);
            }
            job.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Runs `run(0..tasks)`, each index exactly once, on the caller and the pool's helpers.
pub fn parallel_for(tasks: usize, run: &(dyn Fn(usize) + Sync)) {
    let serial = || (0..tasks).for_each(run);
    if tasks <= 1 || thread_count() == 1 {
        return serial();
    }
    let pool = pool();
    if pool.owner_process != std::process::id() {
        return serial();
    }
    let Ok(_owner) = pool.busy.try_lock() else {
        return serial();
    };
    let job = Job { run, tasks, next: AtomicUsize::new(0), active: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
    let published = JobRef((&job as *const Job<'_>).cast::<Job<'static>>());
    {
        let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.job = Some(published);
        slot.generation += 1;
        pool.generation.store(slot.generation, Ordering::Release);
    }
    pool.wake.notify_all();
    let mine = catch_unwind(AssertUnwindSafe(|| job.work()));
    if mine.is_err() {
        job.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
    pool.slot.lock().unwrap_or_else(|e| e.into_inner()).job = None;
    // No helper can pick the job up now; wait for those that did.
    let mut spins = 0u32;
    while job.active.load(Ordering::Acquire) != 0 {
        spins += 1;
        if spins < 1 << 14 { std::hint::spin_loop() } else { std::thread::yield_now() }
    }
    if let Err(payload) = mine {
        std::panic::resume_unwind(payload);
    }
    assert!(!job.panicked.load(Ordering::Acquire), "an opt4gptq CPU helper thread panicked");
}
