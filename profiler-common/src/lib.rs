//! Keys and values shared by the eBPF programs and the userspace collector.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel side writes these into BPF
//! maps and the userspace side reads them back byte for byte.
#![cfg_attr(not(test), no_std)]

// The replay store of `kvm::replay` (tests and userspace) uses std's maps.
#[cfg(any(test, feature = "user"))]
extern crate std;

pub mod kvm;

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
    /// Bookkeeping, not an event: runs of a budgeted VM's uprobes that count no event one for
    /// one (wait entries and returns, `timer_mod` discovery, callbacks), so the overhead budget
    /// knows the traps it really costs. Counted only under [`super::watch_flag::COUNT_HITS`].
    pub const UPROBE_HIT: u32 = 9;
    /// Bookkeeping, not an event: runs of a budgeted VM's uprobe links of an older
    /// [`super::link_generation`] (paused, still being closed), which count nothing else but
    /// cost the traps all the same.
    pub const CLOSING_HIT: u32 = 10;
    /// KVM: a vCPU thread woke from a guest halt after sleeping (`kvm:kvm_vcpu_wakeup` with
    /// `waited`): the guest's own timer (PIT, LAPIC, HPET) or an interrupt woke the host for
    /// it, without QEMU's event loop. id: 0.
    pub const VCPU_WAKEUP: u32 = 11;
    /// KVM: a guest halt ended while KVM was still polling, before the vCPU thread slept
    /// (`kvm:kvm_vcpu_wakeup` without `waited`): host CPU spent spinning, no sleep. id: 0.
    pub const VCPU_HALT_POLL: u32 = 12;
    /// KVM: a VM exit (`kvm:kvm_exit`, fired by VMX and SVM). id: [`super::kvm_exit_id`].
    pub const KVM_EXIT: u32 = 13;
}

/// The counter id of a VM exit: the instruction set (`isa`, 1 VMX, 2 SVM) in the high half,
/// the exit reason in the low.
#[inline(always)]
pub const fn kvm_exit_id(isa: u32, reason: u32) -> u64 {
    ((isa as u64) << 32) | reason as u64
}

/// Flags of a watched process ([`WatchEntry::flags`]).
pub mod watch_flag {
    /// Its waits are counted by the `syscalls:*` tracepoints (the fallback for a QEMU whose
    /// C library's wait functions cannot be probed). Otherwise uprobes on its libc count them
    /// and the tracepoints ignore it.
    pub const WAITS_BY_SYSCALL: u32 = 1;
    /// An overhead budget duty-cycles its uprobes: the wait and timer uprobe programs count
    /// their runs ([`super::kind::UPROBE_HIT`]).
    pub const COUNT_HITS: u32 = 2;
    /// Its waits are counted by the hrtimer tracepoints (`--timer-source hrtimer`): the
    /// sleep timers its wait syscalls arm, expired (a timer) or cancelled (woken earlier).
    pub const WAITS_BY_HRTIMER: u32 = 4;
    /// Its waits are counted by uprobes at its C library's wait results, and
    /// `timer:hrtimer_start` marks its threads whose `ppoll` armed a sleep timer.
    pub const WAITS_BY_LIBC_RESULT: u32 = 8;
}

/// Which wait syscall a counter came from. Stored in [`CounterKey::id`] for wait counters.
pub mod wait_syscall {
    /// A [`super::PendingWait`] whose mark was consumed: an entry kept for reuse, not a wait.
    pub const NONE: u64 = 0;
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
    /// The process the thread belongs to, so userspace can drop a process's entries when it
    /// stops watching it (a thread killed inside its wait never reaches the exit probe).
    pub tgid: u32,
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

/// The fleet the maps are sized for: a dense host's VMs.
pub const SIZED_FOR_VMS: u32 = 2000;
/// Maximum number of QEMU processes watched at once.
pub const MAX_WATCHED: u32 = 8192;
/// Maximum number of distinct counters: 256 per VM (its wait kinds, the regions it touches
/// read and write, its timer callbacks; a busy guest with USB, serial, VGA, HPET, virtio uses
/// about 60) for [`SIZED_FOR_VMS`] VMs. Allocated as used, not up front.
pub const MAX_COUNTERS: u32 = 256 * SIZED_FOR_VMS;
/// Slots of the `COUNTER_META` array, beside the counter store's values.
pub mod counter_meta {
    /// The next never-used slot of `COUNTER_VALUES` (may grow past the array: full).
    pub const NEXT_SLOT: u32 = 0;
    /// Keys inserted into `COUNTER_SLOTS` so far: the index is read again when this moved.
    pub const INSERTS: u32 = 1;
    /// Number of slots.
    pub const SLOTS: u32 = 2;
}

/// Slots of the `WATCH_TABLE` array, where the programs find a watched process: slot
/// `tgid % WATCH_SLOTS` ([`watch_slot`]). A process whose slot another one holds is in the
/// `WATCHED` hash instead, and its slot says so ([`WatchEntry::overflow`]). One array load
/// answers "not watched" for every other process of the host: a hash lookup costs several
/// times as much (docs/benchmarks.md), and the host-wide tracepoints ask it for every task.
pub const WATCH_SLOTS: u32 = 65536;

/// The `WATCH_TABLE` slot of process `tgid`.
pub const fn watch_slot(tgid: u32) -> u32 {
    tgid & (WATCH_SLOTS - 1)
}

/// A watched process, as the programs find it: in its `WATCH_TABLE` slot, written by
/// userspace through a memory mapping (`tgid` last, cleared first), or in the `WATCHED` hash.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchEntry {
    /// The process (0: the slot is free).
    pub tgid: u32,
    /// Its [`watch_flag`]s.
    pub flags: u32,
    /// First slot of its wait counters in `COUNTER_VALUES` ([`wait_block`]), or
    /// [`wait_block::NONE`]: its wait counters are then keyed in `COUNTER_SLOTS` like any other.
    pub wait_block: u32,
    /// In a `WATCH_TABLE` slot: non-zero while processes of this slot are in the `WATCHED`
    /// hash (the slot is another's).
    pub overflow: u32,
    /// Under an overhead budget, the [`link_generation`] whose uprobe links count (odd:
    /// paused, none does); 0 otherwise.
    pub generation: u32,
    /// Keeps the value a multiple of 8 bytes, as the kernel lays out array values.
    pub _reserved: u32,
}

/// Which of a budgeted VM's uprobe links count: each link carries the generation it was
/// attached in, in bits 48–55 of its BPF cookie (bits the sites' own cookies leave free), and
/// the VM's [`WatchEntry::generation`] says which generation counts now. A budget pause makes
/// the VM's generation odd, so its links stop counting at once, while they are closed in the
/// background (a grace period each); a resume makes it the next even one and attaches new
/// links with it, without waiting for the old ones to be gone (they no longer count).
/// Generation 0 is an unbudgeted link's: it counts without looking. Generation [`SHARED`]
/// is a binary-wide link's (every process that maps the binary hits it): it counts for a
/// watched, unbudgeted process.
pub mod link_generation {
    const SHIFT: u32 = 48;
    const MASK: u64 = 0xff << SHIFT;

    /// A link of every process mapping the binary (no pid), shared by its watched VMs.
    pub const SHARED: u32 = 1;

    /// A budgeted VM's first generation.
    pub const FIRST: u32 = 2;

    /// The generation of a link's cookie.
    #[inline(always)]
    pub fn of(cookie: u64) -> u32 {
        ((cookie & MASK) >> SHIFT) as u32
    }

    /// The site's own cookie, without the generation.
    #[inline(always)]
    pub fn strip(cookie: u64) -> u64 {
        cookie & !MASK
    }

    /// `cookie` carrying `generation`.
    pub fn tag(cookie: u64, generation: u32) -> u64 {
        strip(cookie) | (u64::from(generation & 0xff) << SHIFT)
    }

    /// The generation after `generation`: paused after live, live after paused; never 0 or 1
    /// (8 bits, wrapping past 255 to 2, which keeps the parity).
    pub fn next(generation: u32) -> u32 {
        let next = (generation + 1) & 0xff;
        if next < FIRST { next + FIRST } else { next }
    }

    /// Whether a VM at `generation` is paused.
    pub fn is_paused(generation: u32) -> bool {
        generation % 2 == 1
    }
}

/// A watched process's wait counters, at fixed offsets of a block of `COUNTER_VALUES` that
/// userspace allocates when it starts watching the process: the wait programs, which run on
/// every wait of every QEMU thread, count with one array store instead of a hash lookup.
pub mod wait_block {
    use super::{kind, wait_syscall};

    /// Counters per block.
    pub const SLOTS: u32 = 16;
    /// "No block": count through `COUNTER_SLOTS`.
    pub const NONE: u32 = u32::MAX;

    /// The block offset of counter (`kind`, `id`), if it is a wait counter: a kind of the
    /// first four for each of ppoll, epoll_pwait, epoll_pwait2 (0–11), io_uring waits (12),
    /// uprobe hits (13), closing links' hits (14).
    #[inline(always)]
    pub fn offset(kind: u32, id: u64) -> Option<u32> {
        match (kind, id) {
            (kind::TIMER..=kind::WAIT_ERROR, wait_syscall::PPOLL..=wait_syscall::EPOLL_PWAIT2) => {
                Some((id as u32 - 1) * 4 + (kind - kind::TIMER))
            }
            (kind::IO_URING_WAIT, wait_syscall::IO_URING_ENTER) => Some(12),
            (kind::UPROBE_HIT, 0) => Some(13),
            (kind::CLOSING_HIT, 0) => Some(14),
            _ => None,
        }
    }

    /// The counter (kind, id) at block offset `offset`: the inverse of [`offset`].
    pub fn counter(offset: u32) -> Option<(u32, u64)> {
        match offset {
            0..12 => Some((kind::TIMER + offset % 4, u64::from(offset / 4 + 1))),
            12 => Some((kind::IO_URING_WAIT, wait_syscall::IO_URING_ENTER)),
            13 => Some((kind::UPROBE_HIT, 0)),
            14 => Some((kind::CLOSING_HIT, 0)),
            _ => None,
        }
    }
}

/// One CPU's time in its idle task, kept by the `sched_switch_idle` program (a per-CPU array
/// of one slot): what the host's busy time is measured from, exactly, where `/proc/stat` only
/// samples at the tick. Times are `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuIdle {
    /// Nanoseconds this CPU ran its idle task, in the idle periods that ended.
    pub idle_ns: u64,
    /// When this CPU last switched tasks (0: not since the program was attached).
    pub last_switch: u64,
    /// This CPU's idle task (its `struct task_struct *`), learnt when it is first switched out.
    pub idle_task: u64,
    /// 1 while this CPU runs its idle task (since `last_switch`).
    pub idle_now: u64,
}

impl CpuIdle {
    /// This CPU's idle nanoseconds up to `now`, counting an idle period still going on; `None`
    /// while the CPU has not switched since the program was attached (its state is unknown).
    pub fn idle_until(&self, now: u64) -> Option<u64> {
        if self.last_switch == 0 {
            return None;
        }
        let running = if self.idle_now != 0 {
            now.saturating_sub(self.last_switch)
        } else {
            0
        };
        Some(self.idle_ns + running)
    }
}

/// Maximum number of threads inside a wait at once.
pub const MAX_PENDING: u32 = 65536;

/// Slots of the `PPOLL_MARKS` array: the libc result source's per-thread marks of a `ppoll`
/// that armed its sleep timer, at slot `tid % MARK_SLOTS` ([`mark_slot`]) for the thread that
/// claimed the slot first; a thread whose slot another holds keeps its mark in `PENDING`.
pub const MARK_SLOTS: u32 = 65536;

/// The `PPOLL_MARKS` slot of thread `tid`.
pub const fn mark_slot(tid: u32) -> u32 {
    tid & (MARK_SLOTS - 1)
}

/// A `PPOLL_MARKS` slot.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PpollMark {
    /// The thread that holds the slot ([`PpollMark::owner_of`]); 0: free.
    pub owner: u64,
    /// Non-zero: its current `ppoll` armed its sleep timer.
    pub armed: u64,
}

impl PpollMark {
    /// The owner word of thread `tid` of process `tgid` (so userspace can free a process's
    /// slots).
    pub const fn owner_of(tid: u32, tgid: u32) -> u64 {
        ((tid as u64) << 32) | tgid as u64
    }

    /// The process of an owner word.
    pub const fn owner_tgid(owner: u64) -> u32 {
        owner as u32
    }
}

/// A watched thread asleep in a wait syscall with a finite timeout, by the address of the
/// sleep timer it armed (hrtimer source): what the timer's expiry or cancel is counted for.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Sleeper {
    pub tgid: u32,
    /// One of [`wait_syscall`] (as u32).
    pub syscall: u32,
    /// The sleeping thread's `struct task_struct *` (its [`ThreadWait`] slot says the timer
    /// is armed).
    pub task: u64,
}

/// Slots of the `THREAD_WAITS` array (hrtimer source), one per watched thread by
/// [`thread_wait_slot`] of its `struct task_struct *` (what `sched_switch`'s raw tracepoint
/// hands over for the task switched in): a thread whose slot another watched thread's shares
/// overwrites it (the `task` field tells them apart, so a lost mark is a missed count, never
/// a wrong one).
pub const THREAD_WAIT_SLOTS: u32 = 65536;

/// The `THREAD_WAITS` slot of the task at kernel address `task`: a multiplicative hash (task
/// structs are slab objects kilobytes apart, whose low bits say little).
pub const fn thread_wait_slot(task: u64) -> u32 {
    (task.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as u32 % THREAD_WAIT_SLOTS
}

/// What a watched thread is doing in a wait syscall (hrtimer source): it armed a sleep timer
/// (whose expiry or cancel counts the wait), or it went to sleep without one (an infinite
/// timeout: its next switch-in is an fd wakeup).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadWait {
    /// The thread's `struct task_struct *`; 0 for a free slot. Written last when a slot is
    /// filled, first when freed.
    pub task: u64,
    pub tgid: u32,
    /// One of [`thread_wait`].
    pub state: u32,
    /// One of [`wait_syscall`] (as u32).
    pub syscall: u32,
    pub _reserved: u32,
}

/// [`ThreadWait::state`] values.
pub mod thread_wait {
    /// The thread armed its wait's sleep timer.
    pub const ARMED: u32 = 1;
    /// The thread went to sleep in a wait without a sleep timer.
    pub const ASLEEP: u32 = 2;
}

/// Slots of the `DROPPED` array: updates a full map refused, per map.
pub mod dropped {
    pub const COUNTERS: u32 = 0;
    pub const REGION_NAMES: u32 = 1;
    pub const PENDING: u32 = 2;
    pub const SEEN_CALLBACKS: u32 = 3;
    pub const SLEEPERS: u32 = 4;
    /// Number of slots.
    pub const SLOTS: u32 = 5;
    /// Map name of each slot, for reports.
    pub const NAMES: [&str; SLOTS as usize] = [
        "COUNTERS",
        "REGION_NAMES",
        "PENDING",
        "SEEN_CALLBACKS",
        "SLEEPERS",
    ];
}

/// How to fetch one USDT argument from the probe's registers, as libbpf's `usdt.bpf.h` does.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UsdtArgSpec {
    /// Constant value (CONST), offset added to the register (REG_DEREF), or absolute address
    /// (ABS_DEREF, a RIP-relative operand resolved in userspace).
    pub val_off: u64,
    /// Byte offset of the register in `struct pt_regs` (REG, REG_DEREF).
    pub reg_off: u16,
    /// One of [`usdt_arg`].
    pub arg_type: u8,
    /// Sign-extend after narrowing.
    pub signed: u8,
    /// `64 - 8 * size`: shift left then right to keep only the argument's bytes.
    pub bitshift: u8,
    pub _pad: [u8; 3],
}

/// Argument fetch kinds of [`UsdtArgSpec::arg_type`].
pub mod usdt_arg {
    pub const CONST: u8 = 0;
    pub const REG: u8 = 1;
    pub const REG_DEREF: u8 = 2;
    pub const ABS_DEREF: u8 = 3;
}

/// Maximum USDT arguments per probe (SystemTap allows 12).
pub const USDT_MAX_ARGS: usize = 12;

/// The BPF cookie of a USDT site: its spec id in `USDT_SPECS` (bits 0-31) and, when the
/// counted argument (the `MemoryRegion *`) is a whole 64-bit register, a fast path that
/// needs no map lookup to count: the counter kind (bits 32-39), the register's byte offset
/// in `pt_regs` / 8 (bits 40-47) and [`usdt_cookie::FAST`].
pub mod usdt_cookie {
    use super::{UsdtSpec, usdt_arg};

    /// The site's cookie carries kind and register.
    pub const FAST: u64 = 1 << 63;

    /// The cookie of site `spec` stored under `id`.
    pub fn encode(id: u32, spec: &UsdtSpec) -> u64 {
        let Some(arg) = spec.args.get(spec.region_arg as usize) else {
            return u64::from(id);
        };
        let whole_register = arg.arg_type == usdt_arg::REG
            && arg.bitshift == 0
            && arg.reg_off % 8 == 0
            && arg.reg_off / 8 < 21
            && spec.kind < 256;
        if !whole_register {
            return u64::from(id);
        }
        FAST | (u64::from(arg.reg_off / 8) << 40) | (u64::from(spec.kind) << 32) | u64::from(id)
    }

    /// (kind, `pt_regs` byte offset) of a fast cookie.
    pub fn fast(cookie: u64) -> Option<(u32, u16)> {
        (cookie & FAST != 0).then(|| {
            (
                ((cookie >> 32) & 0xff) as u32,
                (((cookie >> 40) & 0xff) * 8) as u16,
            )
        })
    }

    /// The spec id of any cookie.
    pub fn id(cookie: u64) -> u32 {
        cookie as u32
    }
}

/// One attached USDT site: what it counts and where its arguments are. Looked up by the
/// uprobe's BPF cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArgSpec; USDT_MAX_ARGS],
    pub arg_count: u32,
    /// [`kind::READ`] or [`kind::WRITE`].
    pub kind: u32,
    /// Which argument is the `MemoryRegion *` (the counter id).
    pub region_arg: u32,
    /// Which argument is the region's name (`const char *`).
    pub name_arg: u32,
}

/// Key of the region-name map: one name per (process, MemoryRegion pointer).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionKey {
    pub tgid: u32,
    pub _pad: u32,
    pub region: u64,
}

/// Bytes of a region name kept (QEMU names are short: "uhci", "parallel", "apic-msi").
pub const REGION_NAME_LEN: usize = 48;

/// First byte of a [`RegionName`] for a region whose name pointer is NULL.
pub const UNNAMED_REGION_MARK: u8 = 0xff;

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RegionName {
    pub name: [u8; REGION_NAME_LEN],
}

/// Maximum USDT sites attached at once (a handful per QEMU process for read/write).
pub const MAX_USDT_SPECS: u32 = 16384;
/// Maximum distinct (process, region) names and (process, callback) pairs: 128 per VM.
pub const MAX_REGION_NAMES: u32 = 128 * SIZED_FOR_VMS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_wait_slots_spread_task_structs() {
        // Task structs of one slab: ~10 KiB apart. Consecutive ones must not pile into a few
        // slots (the raw tracepoint finds a thread's slot by its task pointer alone).
        let base = 0xffff_8881_0a40_0000_u64;
        let slots: std::collections::BTreeSet<u32> = (0..4096u64)
            .map(|i| thread_wait_slot(base + i * 10_304))
            .collect();
        assert!(slots.len() > 3900, "{} distinct slots of 4096", slots.len());
        assert!(slots.iter().all(|&s| s < THREAD_WAIT_SLOTS));
    }

    fn spec(arg: UsdtArgSpec) -> UsdtSpec {
        let mut args = [UsdtArgSpec::default(); USDT_MAX_ARGS];
        args[1] = arg;
        UsdtSpec {
            args,
            arg_count: 6,
            kind: kind::WRITE,
            region_arg: 1,
            name_arg: 5,
        }
    }

    #[test]
    fn wait_block_offsets_are_distinct_and_invert() {
        let mut seen = [false; wait_block::SLOTS as usize];
        for kind in 0..=kind::CLOSING_HIT + 1 {
            for id in 0..=wait_syscall::IO_URING_ENTER + 1 {
                let Some(offset) = wait_block::offset(kind, id) else {
                    continue;
                };
                assert!(!seen[offset as usize], "offset {offset} twice");
                seen[offset as usize] = true;
                assert_eq!(wait_block::counter(offset), Some((kind, id)));
            }
        }
        // Every wait kind of every wait syscall has one, and both kinds of hits.
        assert_eq!(seen.iter().filter(|s| **s).count(), 15);
        assert_eq!(wait_block::offset(kind::READ, 1), None);
        assert_eq!(wait_block::counter(15), None);
        assert_eq!(watch_slot(WATCH_SLOTS + 5), 5);
    }

    #[test]
    fn link_generations_keep_the_sites_cookies_and_alternate_live_and_paused() {
        // Every site cookie the sources make keeps its bits: a fast USDT cookie (bit 63,
        // bits 32-47), a dispatch cookie (kind << 32 | name offset), a callback address.
        let cookies = [
            usdt_cookie::FAST | (20 << 40) | (7 << 32) | 1234,
            (6 << 32) | 0x38,
            0x0000_7fff_ffff_f000,
        ];
        let mut g = link_generation::FIRST;
        for _ in 0..600 {
            for c in cookies {
                let tagged = link_generation::tag(c, g);
                assert_eq!(link_generation::of(tagged), g);
                assert_eq!(link_generation::strip(tagged), c);
                assert_eq!(usdt_cookie::fast(tagged), usdt_cookie::fast(c));
                assert_eq!(usdt_cookie::id(tagged), usdt_cookie::id(c));
            }
            let next = link_generation::next(g);
            assert!(
                (link_generation::FIRST..=255).contains(&next),
                "{g} -> {next}"
            );
            assert_ne!(
                link_generation::is_paused(next),
                link_generation::is_paused(g),
                "{g} -> {next}"
            );
            g = next;
        }
        assert!(!link_generation::is_paused(link_generation::FIRST));
        assert_eq!(link_generation::of(0x38), 0, "an unbudgeted link");
    }

    #[test]
    fn usdt_cookies_carry_a_whole_register_and_the_kind() {
        let rsi = UsdtArgSpec {
            arg_type: usdt_arg::REG,
            reg_off: 104,
            ..UsdtArgSpec::default()
        };
        let c = usdt_cookie::encode(7, &spec(rsi));
        assert_eq!(usdt_cookie::fast(c), Some((kind::WRITE, 104)));
        assert_eq!(usdt_cookie::id(c), 7);
        // A narrowed register, a memory operand, a bad argument index: the map path.
        for slow in [
            UsdtArgSpec {
                bitshift: 32,
                ..rsi
            },
            UsdtArgSpec {
                arg_type: usdt_arg::REG_DEREF,
                ..rsi
            },
        ] {
            let c = usdt_cookie::encode(9, &spec(slow));
            assert_eq!((usdt_cookie::fast(c), usdt_cookie::id(c)), (None, 9));
        }
        let mut bad = spec(rsi);
        bad.region_arg = 99;
        assert_eq!(usdt_cookie::encode(3, &bad), 3);
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::CpuIdle {}
    unsafe impl aya::Pod for super::PendingWait {}
    unsafe impl aya::Pod for super::Sleeper {}
    unsafe impl aya::Pod for super::ThreadWait {}
    unsafe impl aya::Pod for super::WatchEntry {}
    unsafe impl aya::Pod for super::PpollMark {}
    unsafe impl aya::Pod for super::UsdtArgSpec {}
    unsafe impl aya::Pod for super::UsdtSpec {}
    unsafe impl aya::Pod for super::RegionKey {}
    unsafe impl aya::Pod for super::RegionName {}
}
