//! Detaching uprobes off the sampling thread.
//!
//! Closing a uprobe link removes its breakpoint at once, then waits for an RCU grace period in
//! the kernel (the handlers must be done before the probe's memory goes): measured here at
//! over a second for a busy QEMU's dozen links, even in parallel. A budget pause must not
//! stall the sampler that long, so the links are handed over here and closed in parallel in
//! the background (concurrent closes share grace periods). A resume waits until they are.

use std::{
    sync::{
        Arc, Mutex,
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
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Detacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detacher")
            .field("pending", &self.pending)
            .finish()
    }
}

/// At most this many links are closed at once.
const PARALLEL: usize = 32;

impl Default for Detacher {
    fn default() -> Self {
        Self::new()
    }
}

impl Detacher {
    pub fn new() -> Self {
        let (tx, rx) = channel::<Job>();
        let done = Arc::new(Mutex::new(Vec::new()));
        let worker_done = done.clone();
        let worker = std::thread::Builder::new()
            .name("detacher".into())
            .spawn(move || work(rx, worker_done))
            .ok();
        Self {
            tx: worker.as_ref().map(|_| tx),
            done,
            pending: Default::default(),
            worker,
        }
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
                    let took = close_all(job.items, job.requested);
                    lock(&self.done).push((pid, took));
                }
            }
            None => {
                let took = close_all(job.items, job.requested);
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

    /// Pauses that took effect since the last call: (pid, time from the request until every
    /// link was closed).
    pub fn finished(&mut self) -> Vec<(u32, Duration)> {
        let finished: Vec<(u32, Duration)> = std::mem::take(&mut *lock(&self.done));
        for (pid, _) in &finished {
            self.pending.remove(pid);
        }
        finished
    }

    /// Waits for every detach under way (at exit: QEMU must be left as it was found).
    pub fn drain(&mut self) {
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

/// Closes every item, `PARALLEL` at a time; returns the time since `requested`.
fn close_all(items: Vec<Detach>, requested: Instant) -> Duration {
    let mut items = items;
    while !items.is_empty() {
        let batch: Vec<Detach> = items.drain(..items.len().min(PARALLEL)).collect();
        std::thread::scope(|s| {
            for item in batch {
                s.spawn(move || drop(item));
            }
        });
    }
    requested.elapsed()
}

fn work(rx: Receiver<Job>, done: Arc<Mutex<Vec<(u32, Duration)>>>) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile goes in the same round of parallel closes.
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut results = Vec::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .into_iter()
                .map(|job| s.spawn(move || (job.pid, close_all(job.items, job.requested))))
                .collect();
            for h in handles {
                if let Ok(r) = h.join() {
                    results.push(r);
                }
            }
        });
        lock(&done).extend(results);
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
    fn closes_in_parallel_and_reports_when_each_pause_took_effect() {
        let closed = Arc::new(Mutex::new(0));
        let mut d = Detacher::new();
        let items = |n| -> Vec<Detach> {
            (0..n)
                .map(|_| Box::new(Slow(closed.clone())) as Detach)
                .collect()
        };
        let started = Instant::now();
        d.submit(7, items(10));
        d.submit(8, items(5));
        assert!(d.is_pending(7));
        let mut finished = Vec::new();
        while finished.len() < 2 {
            finished.extend(d.finished());
            std::thread::sleep(Duration::from_millis(10));
        }
        // Fifteen 0.1 s closes at once: well under the 1.5 s one after the other.
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(*lock(&closed), 15);
        finished.sort_by_key(|f| f.0);
        assert_eq!(finished.iter().map(|f| f.0).collect::<Vec<_>>(), [7, 8]);
        assert!(finished.iter().all(|f| f.1 >= Duration::from_millis(100)));
        assert!(!d.is_pending(7));
        d.submit(9, items(3));
        d.drain();
        assert_eq!(*lock(&closed), 18, "drain waits for everything");
    }
}
