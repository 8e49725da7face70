//! Detaching uprobes off the sampling thread.
//!
//! Closing a perf-event uprobe link waits for an RCU grace period (the handlers must be done
//! before the probe's memory goes), one per link (docs/benchmarks.md, "teardown"). Concurrent
//! closes share grace periods, but a uprobe being opened meanwhile waits behind all of them.
//! So the links of paused and
//! exited VMs are handed over here and closed in the background, in parallel batches, and the
//! closer holds back between batches while the sampler attaches (see [`Detacher::hold`]). A
//! budget resume does not wait for its VM's old links: they no longer count (see
//! `profiler_common::link_generation`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Something whose drop detaches a probe (an aya link, a kernel-managed USDT uprobe, a
/// semaphore raised by hand).
pub type Detach = Box<dyn Send>;

struct Job {
    pid: u32,
    items: Vec<Detach>,
    requested: Instant,
}

/// The background closer.
pub struct Detacher {
    tx: Option<Sender<Job>>,
    done: Arc<Mutex<Vec<(u32, Duration)>>>,
    pending: std::collections::BTreeSet<u32>,
    /// Attaches under way: the closer waits while this is not zero…
    holds: Arc<AtomicUsize>,
    /// …unless someone waits for closes to finish ([`Detacher::wait_for`], typically inside
    /// an attach that holds the closer: waiting out the hold there would never end).
    waiters: Arc<AtomicUsize>,
    /// Exiting: no batches any more.
    draining: Arc<std::sync::atomic::AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

/// Keeps the closer waiting while it lives (an attach is under way).
#[must_use = "the hold ends when this is dropped"]
pub struct Hold(Arc<AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Detacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detacher")
            .field("pending", &self.pending)
            .finish()
    }
}

impl Default for Detacher {
    fn default() -> Self {
        Self::new()
    }
}

impl Detacher {
    pub fn new() -> Self {
        let (tx, rx) = channel::<Job>();
        let done = Arc::new(Mutex::new(Vec::new()));
        let holds = Arc::new(AtomicUsize::new(0));
        let waiters = Arc::new(AtomicUsize::new(0));
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Gate {
            holds: holds.clone(),
            waiters: waiters.clone(),
            draining: draining.clone(),
        };
        let worker_done = done.clone();
        let worker = std::thread::Builder::new()
            .name("detacher".into())
            .spawn(move || work(rx, worker_done, gate))
            .ok();
        Self {
            tx: worker.as_ref().map(|_| tx),
            done,
            pending: Default::default(),
            holds,
            waiters,
            draining,
            worker,
        }
    }

    /// Holds the closer back until the returned guard is dropped, so that an attach does not
    /// wait behind the queued closes (at most behind the one in flight).
    pub fn hold(&self) -> Hold {
        self.holds.fetch_add(1, Ordering::SeqCst);
        Hold(self.holds.clone())
    }

    /// Closes `items` (all of VM `pid`'s paused links) in the background.
    pub fn submit(&mut self, pid: u32, items: Vec<Detach>) {
        let job = Job {
            pid,
            items,
            requested: Instant::now(),
        };
        match &self.tx {
            Some(tx) => {
                self.pending.insert(pid);
                if let Err(e) = tx.send(job) {
                    // No worker: close here.
                    let job = e.0;
                    self.pending.remove(&pid);
                    let took = close_all(job.items, job.requested, &Gate::open());
                    lock(&self.done).push((pid, took));
                }
            }
            None => {
                let took = close_all(job.items, job.requested, &Gate::open());
                lock(&self.done).push((pid, took));
            }
        }
    }

    /// Whether a detach of `pid` is still under way.
    pub fn is_pending(&mut self, pid: u32) -> bool {
        self.collect_pending();
        self.pending.contains(&pid)
    }

    fn collect_pending(&mut self) {
        let done = lock(&self.done);
        for (pid, _) in done.iter() {
            self.pending.remove(pid);
        }
    }

    /// Blocks until the detach of `pid` under way (if any) is done; the closer goes on
    /// meanwhile even if an attach holds it (the caller's own, usually).
    pub fn wait_for(&mut self, pid: u32) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while self.is_pending(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Pauses that took effect since the last call: (pid, time from the request until every
    /// link was closed).
    pub fn finished(&mut self) -> Vec<(u32, Duration)> {
        let finished: Vec<(u32, Duration)> = std::mem::take(&mut *lock(&self.done));
        for (pid, _) in &finished {
            self.pending.remove(pid);
        }
        finished
    }

    /// Waits for every detach under way (at exit: QEMU must be left as it was found), closing
    /// what is left all at once.
    pub fn drain(&mut self) {
        self.draining.store(true, Ordering::SeqCst);
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Detacher {
    fn drop(&mut self) {
        self.drain();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// At most this many links are closed at once while the profiler runs (concurrent closes
/// share grace periods; a multi-uprobe link's release waits for one, a per-site link's too).
/// At exit every link is closed at once (docs/benchmarks.md, `bench teardown`).
const BATCH: usize = 64;

/// When the closer may close: no attach holds it, or someone waits for it.
struct Gate {
    holds: Arc<AtomicUsize>,
    waiters: Arc<AtomicUsize>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    /// Never closed (no worker: closing on the caller's thread).
    fn open() -> Self {
        Self {
            holds: Arc::new(AtomicUsize::new(0)),
            waiters: Arc::new(AtomicUsize::new(0)),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn is_closed(&self) -> bool {
        self.holds.load(Ordering::SeqCst) > 0 && self.waiters.load(Ordering::SeqCst) == 0
    }
}

/// Closes every item, a batch at a time, each batch once the gate is open; returns the time
/// since `requested`. With no holds (at exit) nothing waits.
fn close_all(items: Vec<Detach>, requested: Instant, gate: &Gate) -> Duration {
    let mut items = items;
    while !items.is_empty() {
        while gate.is_closed() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let size = if gate.draining.load(Ordering::SeqCst) {
            items.len()
        } else {
            BATCH
        };
        let batch: Vec<Detach> = items.drain(..items.len().min(size)).collect();
        std::thread::scope(|s| {
            for item in batch {
                s.spawn(move || drop(item));
            }
        });
    }
    requested.elapsed()
}

fn work(rx: Receiver<Job>, done: Arc<Mutex<Vec<(u32, Duration)>>>, gate: Gate) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile is closed in the same batches.
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let requested = jobs.iter().map(|j| j.requested).min().expect("one job");
        let pids: Vec<u32> = jobs.iter().map(|j| j.pid).collect();
        let items: Vec<Detach> = jobs.into_iter().flat_map(|j| j.items).collect();
        let took = close_all(items, requested, &gate);
        lock(&done).extend(pids.into_iter().map(|pid| (pid, took)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slow(Arc<Mutex<u32>>);

    impl Drop for Slow {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(100));
            *lock(&self.0) += 1;
        }
    }

    #[test]
    fn closes_in_the_background_and_waits_while_an_attach_holds_it() {
        let closed = Arc::new(Mutex::new(0));
        let mut d = Detacher::new();
        let items = |n| -> Vec<Detach> {
            (0..n)
                .map(|_| Box::new(Slow(closed.clone())) as Detach)
                .collect()
        };
        let hold = d.hold();
        d.submit(7, items(2));
        d.submit(8, items(1));
        assert!(d.is_pending(7));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(*lock(&closed), 0, "nothing closes while held");
        drop(hold);
        let mut finished = Vec::new();
        while finished.len() < 2 {
            finished.extend(d.finished());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*lock(&closed), 3);
        assert_eq!(finished.iter().map(|f| f.0).collect::<Vec<_>>(), [7, 8]);
        // Each pause's time runs from its request to its last close.
        assert!(finished.iter().all(|f| f.1 >= Duration::from_millis(400)));
        assert!(!d.is_pending(7));
        // Waiting for a close inside an attach's own hold (re-attaching shared tracepoints
        // whose last user just left) goes through the hold instead of waiting on itself.
        let hold = d.hold();
        d.submit(10, items(2));
        d.wait_for(10);
        assert_eq!(*lock(&closed), 5);
        drop(hold);
        d.submit(9, items(3));
        d.drain();
        assert_eq!(*lock(&closed), 8, "drain waits for everything");
    }
}
