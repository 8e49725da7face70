//! Keys and values shared by the eBPF programs and the userspace collector.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel side writes these into BPF
//! maps and the userspace side reads them back byte for byte.
#![no_std]

/// What a counter counts. Stored as `u32` in [`CounterKey::kind`].
pub mod kind {
    /// A QEMU thread's wait syscall returned 0 after a finite, non-zero timeout: a deadline
    /// (a QEMU timer) woke it.
    pub const TIMER: u32 = 1;
    /// A wait syscall returned > 0: a file descriptor (ioeventfd, eventfd, socket, tty) woke it.
    pub const FD_WAKEUP: u32 = 2;
    /// A wait syscall returned 0 after a zero timeout: a non-blocking check, not a wakeup.
    pub const NONBLOCKING_POLL: u32 = 3;
    /// A wait syscall returned an error (EINTR from a signal, mostly).
    pub const WAIT_ERROR: u32 = 4;
    /// `io_uring_enter` waited for completions; whether a timeout or an fd completed the wait is
    /// in the completion queue, which the probe does not read.
    pub const IO_URING_WAIT: u32 = 5;
    /// A guest read of an emulated device (id: the device/region id).
    pub const READ: u32 = 6;
    /// A guest write to an emulated device (id: the device/region id).
    pub const WRITE: u32 = 7;
    /// A QEMU timer callback ran (id: the callback's address).
    pub const TIMER_CALLBACK: u32 = 8;
}

/// Which wait syscall a counter came from. Stored in [`CounterKey::id`] for wait counters.
pub mod wait_syscall {
    pub const PPOLL: u64 = 1;
    pub const EPOLL_PWAIT: u64 = 2;
    pub const EPOLL_PWAIT2: u64 = 3;
    pub const IO_URING_ENTER: u64 = 4;
}

/// Key of the per-CPU counter map: one counter per (QEMU process, kind, id).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// Thread group id (the QEMU process id).
    pub tgid: u32,
    /// One of [`kind`].
    pub kind: u32,
    /// Kind-specific: the wait syscall for wait counters, a region id for reads/writes, a
    /// callback address for timer callbacks.
    pub id: u64,
}

/// How the timeout of a wait syscall looked when the thread entered it, remembered per thread
/// until the syscall exits.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PendingWait {
    /// One of [`wait_syscall`].
    pub syscall: u64,
    /// One of [`timeout_class`].
    pub timeout: u32,
    pub _pad: u32,
}

/// Classification of a wait syscall's timeout argument.
pub mod timeout_class {
    /// NULL timespec / negative milliseconds: wait forever.
    pub const INFINITE: u32 = 0;
    /// A zero timeout: return at once.
    pub const ZERO: u32 = 1;
    /// A finite, non-zero timeout.
    pub const FINITE: u32 = 2;
    /// The timeout could not be read from user memory.
    pub const UNKNOWN: u32 = 3;
    /// io_uring_enter with IORING_ENTER_GETEVENTS and min_complete > 0.
    pub const IO_URING_GETEVENTS: u32 = 4;
    /// io_uring_enter that only submits.
    pub const IO_URING_SUBMIT_ONLY: u32 = 5;
}

/// Maximum number of QEMU processes watched at once.
pub const MAX_WATCHED: u32 = 8192;
/// Maximum number of distinct counters.
pub const MAX_COUNTERS: u32 = 65536;
/// Maximum number of threads inside a wait syscall at once.
pub const MAX_PENDING: u32 = 65536;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::PendingWait {}
}
