//! Where the multi-uprobe links' descriptors live: spread over threads that each have a
//! descriptor table of their own.
//!
//! Releasing a multi-uprobe link waits for a grace period. A process killed with SIGKILL
//! releases the descriptors of a table one after the other in its exit, so a profiler holding
//! every link in one table would take one grace period per link to be gone (and keep its
//! breakpoints in every QEMU meanwhile). Threads that unshared their table release theirs in
//! their own exits, in parallel: a killed profiler is gone after as many grace periods as the
//! fullest table holds links. The same tables close links one thread per close while the
//! profiler runs, so closes still overlap (see [`super::detacher`]).
//!
//! Where the kernel cannot (no `close_range(CLOSE_RANGE_UNSHARE)`, Linux 5.9, or no
//! `pidfd_getfd`, 5.6), a link keeps its descriptor in the process's own table.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, Sender, SyncSender, channel, sync_channel},
    },
};

/// How many tables: a killed profiler's exit takes about (links / TABLES) grace periods.
const TABLES: usize = 64;

/// The threads' stacks: they only wait on a channel and make a syscall.
const STACK: usize = 64 * 1024;

enum Request {
    /// Copy this descriptor of the process's table into the keeper's.
    Adopt(RawFd, SyncSender<io::Result<RawFd>>),
    /// Close this descriptor of the keeper's table, answering once it is released.
    Close(RawFd, SyncSender<()>),
}

struct Keeper {
    tx: std::sync::Mutex<Sender<Request>>,
    held: AtomicUsize,
}

/// A descriptor held in a keeper's table, closed (and waited for) when dropped.
#[derive(Debug)]
pub enum KeptFd {
    Table {
        keeper: usize,
        fd: RawFd,
    },
    /// Where no keeper could take it.
    Own(OwnedFd),
}

impl Drop for KeptFd {
    fn drop(&mut self) {
        if let KeptFd::Table { keeper, fd } = *self
            && let Some(Some(keepers)) = KEEPERS.get()
        {
            let k = &keepers[keeper];
            let (done_tx, done_rx) = sync_channel(1);
            let sent =
                k.tx.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Request::Close(fd, done_tx));
            if sent.is_ok() {
                let _ = done_rx.recv();
            }
            k.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

static KEEPERS: OnceLock<Option<Vec<Keeper>>> = OnceLock::new();

/// Moves `fd` into the least-full keeper's table (the process's copy is closed), or keeps it
/// as it is where there are no keepers.
pub fn keep(fd: OwnedFd) -> KeptFd {
    let Some(keepers) = KEEPERS.get_or_init(start) else {
        return KeptFd::Own(fd);
    };
    let (index, keeper) = keepers
        .iter()
        .enumerate()
        .min_by_key(|(_, k)| k.held.load(Ordering::Relaxed))
        .expect("TABLES > 0");
    let (reply_tx, reply_rx) = sync_channel(1);
    let sent = keeper
        .tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Request::Adopt(fd.as_raw_fd(), reply_tx));
    match sent.ok().and_then(|_| reply_rx.recv().ok()) {
        Some(Ok(copy)) => {
            keeper.held.fetch_add(1, Ordering::Relaxed);
            // The keeper's copy holds the link: closing this one releases nothing.
            drop(fd);
            KeptFd::Table {
                keeper: index,
                fd: copy,
            }
        }
        _ => KeptFd::Own(fd),
    }
}

/// How many links the keepers hold (`None`: no keepers on this kernel).
pub fn held() -> Option<usize> {
    match KEEPERS.get() {
        Some(Some(keepers)) => Some(keepers.iter().map(|k| k.held.load(Ordering::Relaxed)).sum()),
        _ => None,
    }
}

fn start() -> Option<Vec<Keeper>> {
    let mut keepers = Vec::with_capacity(TABLES);
    for i in 0..TABLES {
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = sync_channel(1);
        std::thread::Builder::new()
            .name(format!("link-table-{i}"))
            .stack_size(STACK)
            .spawn(move || keeper(rx, ready_tx))
            .ok()?;
        ready_rx.recv().ok()?.ok()?;
        keepers.push(Keeper {
            tx: std::sync::Mutex::new(tx),
            held: AtomicUsize::new(0),
        });
    }
    Some(keepers)
}

/// A keeper: a table of its own holding only the links given to it.
fn keeper(rx: Receiver<Request>, ready: SyncSender<io::Result<()>>) {
    // Signals go to the threads that share the process's descriptors: a handler run here
    // would write to the runtime's wake-up pipe through a descriptor this table does not
    // hold, and the signal would be lost (a SIGTERM to `record` was, under load). The close
    // threads spawned from here inherit the mask.
    // SAFETY: sigfillset fills a plain sigset_t; pthread_sigmask changes this thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    // SAFETY: plain syscalls. close_range with CLOSE_RANGE_UNSHARE gives this thread a copy
    // of the table and closes every descriptor in the copy (the process's stay open).
    let unshared = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            0 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
    if unshared != 0 {
        let _ = ready.send(Err(io::Error::last_os_error()));
        return;
    }
    // The process's table is its leader's: the pidfd of the process reaches it.
    // SAFETY: as above.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if pidfd < 0 {
        let _ = ready.send(Err(io::Error::last_os_error()));
        return;
    }
    // SAFETY: a descriptor the kernel just gave this table.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Ok(request) = rx.recv() {
        match request {
            Request::Adopt(fd, reply) => {
                // SAFETY: as above.
                let copy = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_getfd,
                        pidfd.as_raw_fd(),
                        fd,
                        0 as libc::c_uint,
                    )
                };
                let _ = reply.send(if copy < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(copy as RawFd)
                });
            }
            Request::Close(fd, done) => {
                // A thread of this keeper shares its table; closes overlap their grace
                // periods. Where no thread starts, the keeper closes it itself.
                let close = move || {
                    // SAFETY: a descriptor this table holds for the `KeptFd` being dropped.
                    unsafe { libc::close(fd) };
                    let _ = done.send(());
                };
                let (tx, rx) = sync_channel::<Box<dyn FnOnce() + Send>>(1);
                let spawned = std::thread::Builder::new()
                    .name("link-close".into())
                    .stack_size(STACK)
                    .spawn(move || {
                        if let Ok(f) = rx.recv() {
                            f()
                        }
                    });
                match spawned {
                    Ok(_) => {
                        let _ = tx.send(Box::new(close));
                    }
                    Err(_) => close(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_descriptor_stays_open_elsewhere_until_dropped() {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let kept = keep(OwnedFd::from(writer));
        // The writer lives on in the keeper's table: no end of file yet.
        let reader_fd = OwnedFd::from(reader);
        // SAFETY: a valid descriptor; O_NONBLOCK to read without waiting.
        unsafe {
            libc::fcntl(reader_fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        }
        let mut byte = [0u8; 1];
        let read = |b: &mut [u8]| unsafe {
            // SAFETY: reading into a one-byte buffer.
            libc::read(reader_fd.as_raw_fd(), b.as_mut_ptr().cast(), 1)
        };
        if matches!(kept, KeptFd::Table { .. }) {
            assert_eq!(read(&mut byte), -1, "a writer is still open");
            assert!(held() >= Some(1));
        }
        drop(kept);
        assert_eq!(
            read(&mut byte),
            0,
            "end of file once the kept writer is closed"
        );
    }

    /// A process-directed signal must reach a thread that shares the process's descriptors:
    /// every keeper blocks them all.
    #[test]
    fn keepers_take_no_signal() {
        let (_reader, writer) = std::io::pipe().expect("pipe");
        let kept = keep(OwnedFd::from(writer));
        if !matches!(kept, KeptFd::Table { .. }) {
            // No keepers on this kernel: the process's own table holds the links.
            return;
        }
        let tasks = std::fs::read_dir("/proc/self/task").unwrap();
        let mut keepers = 0;
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if !status.lines().any(|l| l.starts_with("Name:\tlink-table-")) {
                continue;
            }
            keepers += 1;
            let blocked = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .unwrap();
            let term = 1u64 << (libc::SIGTERM - 1);
            let int = 1u64 << (libc::SIGINT - 1);
            assert_eq!(blocked & (term | int), term | int, "{status}");
        }
        assert_eq!(keepers, TABLES);
    }
}
