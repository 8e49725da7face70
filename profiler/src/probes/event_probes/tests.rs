//! Root tests on the real kernel: an attach that fails part-way leaves nothing behind.

use std::{
    process::{Child, Command},
    sync::Arc,
};

use ::object::{Object as _, ObjectSegment as _};
use aya::maps::{HashMap as BpfHashMap, MapData};
use profiler_common::{USDT_MAX_ARGS, UsdtArgSpec, UsdtSpec, kind};

use super::*;
use crate::offer::libc::LibcProbes;
use crate::probes::{
    kernel::{shared_links, test_support::root_test, uprobes::UprobePoint},
    sources::{
        symbols::{DISPATCH_PROGRAM, SymbolSource},
        usdt::{self, SPECS_MAP, SiteToAttach, UsdtSource},
    },
};

/// The multi-uprobe copies of every uprobe program on `ebpf`, as `EventProbes::load` makes
/// them, when `on`.
fn multi(ebpf: &Ebpf, on: bool) -> Option<Arc<uprobe_multi::MultiPrograms>> {
    let programs: Vec<&str> = SymbolSource::PROGRAMS
        .into_iter()
        .chain([usdt::PROGRAM])
        .chain(LibcWaitSource::programs())
        .collect();
    on.then(|| {
        Arc::new(
            uprobe_multi::MultiPrograms::load(ebpf, object::EBPF_OBJECT, &programs)
                .expect("multi-uprobe copies of the programs"),
        )
    })
}

/// Whether this kernel makes no multi-uprobe links (said, and the test skipped).
fn multi_links_missing(test: &str) -> bool {
    match uprobe_multi::offered() {
        Ok(()) => false,
        Err(why) => {
            xtask::prereq::Prereq::new(test).host_lacks::<()>(&why);
            true
        }
    }
}

/// A process to attach to: `sleep`, killed on drop.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (`sleep`, the file offset of its entry point: a valid uprobe site).
fn sleeper() -> (Sleeper, u64) {
    let child = Command::new("sleep").arg("60").spawn().expect("sleep runs");
    let pid = child.id();
    // exec is done once /proc/PID/exe points at sleep and sleep is mapped: the kernel sets
    // the link before it maps the new program.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let execd = || {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        (exe.to_string_lossy().ends_with("sleep")
            && maps.lines().any(|l| l.ends_with(&*exe.to_string_lossy())))
        .then_some(())
    };
    while execd().is_none() {
        assert!(std::time::Instant::now() < deadline, "sleep never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let bytes = std::fs::read(format!("/proc/{pid}/exe")).unwrap();
    let elf = ::object::File::parse(&*bytes).unwrap();
    let entry = elf.entry();
    let offset = elf
        .segments()
        .find_map(|s| {
            let (start, size) = (s.address(), s.size());
            let (file_off, _) = s.file_range();
            (start..start + size)
                .contains(&entry)
                .then(|| file_off + (entry - start))
        })
        .expect("entry point in a segment");
    (Sleeper(child), offset)
}

/// Our perf events and BPF links, in every descriptor table of ours.
fn probe_fds() -> usize {
    xtask::links::probe_links(std::process::id())
}

/// A source loaded (with multi links or per site), a sleeping process to attach it to (its
/// pid, an offset in its code) and the probe links before any attach.
fn source_and_sleeper<S>(
    ebpf: &mut Ebpf,
    multi_links: bool,
    load: impl FnOnce(&mut Ebpf, Option<Arc<uprobe_multi::MultiPrograms>>) -> anyhow::Result<S>,
) -> (S, Sleeper, u32, u64, usize) {
    let multi = multi(ebpf, multi_links);
    let source = load(ebpf, multi).unwrap();
    let (sleeper, entry) = sleeper();
    let pid = sleeper.0.id();
    (source, sleeper, pid, entry, probe_fds())
}

fn spec_entries(ebpf: &mut Ebpf) -> usize {
    let map: BpfHashMap<&MapData, u32, UsdtSpec> =
        BpfHashMap::try_from(ebpf.map(SPECS_MAP).unwrap()).unwrap();
    map.keys().count()
}

fn spec() -> UsdtSpec {
    UsdtSpec {
        args: [UsdtArgSpec::default(); USDT_MAX_ARGS],
        arg_count: 6,
        kind: kind::READ,
        region_arg: 1,
        name_arg: 5,
    }
}

/// The symbols analysis of process `pid`'s executable.
fn analyzed_exe(pid: u32) -> Arc<crate::offer::symbols::ExeSymbols> {
    Arc::new(
        crate::offer::symbols::analyze(
            &std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
            &crate::offer::elf::DebugRoots::system(),
        )
        .unwrap(),
    )
}

/// Two dispatch points, cookies 1 and 2.
fn two_points(first: u64, second: u64) -> [UprobePoint; 2] {
    [
        UprobePoint {
            file_offset: first,
            cookie: 1,
        },
        UprobePoint {
            file_offset: second,
            cookie: 2,
        },
    ]
}

/// `n` zero-timeout `ppoll`s of this thread.
fn zero_timeout_polls(n: u32) {
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    for _ in 0..n {
        // SAFETY: no fds, a valid timespec, no signal mask.
        unsafe { libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null()) };
    }
}

/// Stops watching `pid` and drops its counters.
fn unwatch(
    ebpf: &mut Ebpf,
    table: &mut watch_table::WatchTable,
    counters: &mut counters::CounterStore,
    pid: u32,
) {
    table.remove(ebpf, pid).unwrap();
    counters.forget(ebpf, pid).unwrap();
}

/// This process's libc offer (with result sites), the libc source, counters and watch
/// table, on `ebpf`.
fn own_libc_fixture(
    ebpf: &mut Ebpf,
    multi_links: bool,
) -> (
    LibcOffer,
    LibcWaitSource,
    counters::CounterStore,
    watch_table::WatchTable,
) {
    let offer = LibcCatalog::default().offer(std::process::id()).unwrap();
    offer.result_points().expect("this glibc's wait results");
    let multi = multi(ebpf, multi_links);
    let libc = LibcWaitSource::load(ebpf, multi).unwrap();
    let counters = counters::CounterStore::open(ebpf).unwrap();
    let table = watch_table::WatchTable::open(ebpf).unwrap();
    (offer, libc, counters, table)
}

#[test]
fn root_a_watched_process_is_counted_in_its_slot_in_the_overflow_hash_and_keyed() {
    use profiler_common::{WATCH_SLOTS, wait_block, wait_syscall};
    let (_one_at_a_time, mut ebpf) = root_test!("root_watch_table");
    let pid = std::process::id();
    let (offer, mut libc, mut counters, mut table) = own_libc_fixture(&mut ebpf, false);
    libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, 0)
        .unwrap();
    let polls = zero_timeout_polls;
    let counted = |counters: &mut counters::CounterStore, ebpf: &Ebpf| -> u64 {
        counters
            .read(ebpf)
            .unwrap()
            .iter()
            .filter(|(k, _)| {
                k.tgid == pid && k.kind == kind::NONBLOCKING_POLL && k.id == wait_syscall::PPOLL
            })
            .map(|(_, n)| n)
            .sum()
    };
    let flags = watch_flag::WAITS_BY_LIBC_RESULT;
    polls(100);
    assert_eq!(counted(&mut counters, &ebpf), 0, "not watched yet");
    // Watched with its wait block, first in its own slot, then with its slot held by another
    // process (in the hash, found through the slot's mark): counted, and forgotten once
    // unwatched.
    let other = pid + WATCH_SLOTS;
    for (place, slot_taken) in [("in its slot", false), ("in the overflow hash", true)] {
        if slot_taken {
            table.set(&mut ebpf, other, 0, wait_block::NONE).unwrap();
        }
        let block = counters.wait_block(pid);
        assert_ne!(block, wait_block::NONE);
        table.set(&mut ebpf, pid, flags, block).unwrap();
        polls(1000);
        assert_eq!(counted(&mut counters, &ebpf), 1000, "{place}");
        unwatch(&mut ebpf, &mut table, &mut counters, pid);
        polls(100);
        assert_eq!(counted(&mut counters, &ebpf), 0, "{place}: forgotten");
    }
    // Without a wait block (the store was full): keyed like any counter.
    table.set(&mut ebpf, pid, flags, wait_block::NONE).unwrap();
    polls(500);
    assert_eq!(counted(&mut counters, &ebpf), 500, "keyed");
    libc.detach(&mut ebpf, pid);
    table.remove(&mut ebpf, other).unwrap();
    unwatch(&mut ebpf, &mut table, &mut counters, pid);
}

/// A budget pause: the links of the VM's generation stop counting the moment its
/// generation moves on (their runs are closing hits), and a resume's new links count
/// beside the old ones, still attached, without counting twice.
fn a_paused_generations_links_count_nothing_and_a_resume_counts_once(multi_links: bool) {
    use profiler_common::{link_generation, wait_syscall};
    let (_one_at_a_time, mut ebpf) = root_test!("root_link_generations");
    let pid = std::process::id();
    let (offer, mut libc, mut counters, mut table) = own_libc_fixture(&mut ebpf, multi_links);
    let polls = zero_timeout_polls;
    let count = |counters: &mut counters::CounterStore, ebpf: &Ebpf, kind: u32| -> u64 {
        counters
            .read(ebpf)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.tgid == pid && k.kind == kind)
            .map(|(_, n)| n)
            .sum()
    };
    let first = link_generation::FIRST;
    table.set_generation(&mut ebpf, pid, first).unwrap();
    let block = counters.wait_block(pid);
    let flags = watch_flag::WAITS_BY_LIBC_RESULT | watch_flag::COUNT_HITS;
    table.set(&mut ebpf, pid, flags, block).unwrap();
    libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, first)
        .unwrap();
    polls(1000);
    let polled = |c: &mut counters::CounterStore, e: &Ebpf| count(c, e, kind::NONBLOCKING_POLL);
    assert_eq!(polled(&mut counters, &ebpf), 1000, "live");
    assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1000);
    assert_eq!(count(&mut counters, &ebpf, kind::CLOSING_HIT), 0);
    // Paused, the links still attached (as while the detacher closes them).
    let paused = link_generation::next(first);
    table.set_generation(&mut ebpf, pid, paused).unwrap();
    let old = libc.take(&mut ebpf, pid);
    polls(700);
    assert_eq!(
        polled(&mut counters, &ebpf),
        1000,
        "a paused link counts nothing"
    );
    assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1000);
    assert_eq!(count(&mut counters, &ebpf, kind::CLOSING_HIT), 700);
    // Resumed before the old links are closed: each poll counted once, by the new link.
    let live = link_generation::next(paused);
    libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, live)
        .unwrap();
    table.set_generation(&mut ebpf, pid, live).unwrap();
    polls(500);
    assert_eq!(polled(&mut counters, &ebpf), 1500, "counted once");
    assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1500);
    assert_eq!(
        count(&mut counters, &ebpf, kind::CLOSING_HIT),
        1200,
        "the old links ran"
    );
    let ppolls = counters
        .read(&ebpf)
        .unwrap()
        .iter()
        .filter(|(k, _)| k.tgid == pid && k.id == wait_syscall::PPOLL)
        .count();
    assert!(ppolls > 0, "ppoll counters present");
    drop(old);
    polls(300);
    assert_eq!(polled(&mut counters, &ebpf), 1800);
    assert_eq!(
        count(&mut counters, &ebpf, kind::CLOSING_HIT),
        1200,
        "old links gone"
    );
    libc.detach(&mut ebpf, pid);
    unwatch(&mut ebpf, &mut table, &mut counters, pid);
}

#[test]
fn root_ppoll_timer_marks_are_exact_in_the_thread_slot_and_in_pending() {
    use profiler_common::{MARK_SLOTS, PpollMark, mark_slot, wait_syscall};
    use std::{mem::offset_of, sync::atomic::Ordering};
    let (_one_at_a_time, mut ebpf) = root_test!("root_ppoll_marks");
    let pid = std::process::id();
    // SAFETY: no arguments.
    let tid = unsafe { libc::gettid() } as u32;
    let offer = LibcCatalog::default().offer(pid).unwrap();
    let tracefs = crate::offer::tracefs::ensure_tracefs().unwrap();
    let mut libc = LibcWaitSource::load(&mut ebpf, None).unwrap();
    let mut hrtimers = hrtimers::HrtimerWaits::load(&mut ebpf, &tracefs);
    let mut counters = counters::CounterStore::open(&ebpf).unwrap();
    let mut table = watch_table::WatchTable::open(&ebpf).unwrap();
    hrtimers.acquire_starts(&mut ebpf, pid).unwrap();
    let block = counters.wait_block(pid);
    table
        .set(&mut ebpf, pid, watch_flag::WAITS_BY_LIBC_RESULT, block)
        .unwrap();
    libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, 0)
        .unwrap();
    // Timed-out ppolls (a timer) alternate with zero-timeout ones: each mark is consumed
    // by its own wait's result.
    let waits = |n: u32| {
        for _ in 0..n {
            for nanos in [200_000, 0] {
                let timeout = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: nanos,
                };
                // SAFETY: no fds, a valid timespec, no signal mask.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &timeout, std::ptr::null()) };
            }
        }
    };
    let ppolls = |counters: &mut counters::CounterStore, ebpf: &Ebpf| -> (u64, u64) {
        let counts = counters.read(ebpf).unwrap();
        let of = |kind| {
            counts
                .iter()
                .filter(|(k, _)| k.tgid == pid && k.kind == kind && k.id == wait_syscall::PPOLL)
                .map(|(_, n)| n)
                .sum()
        };
        (of(kind::TIMER), of(kind::NONBLOCKING_POLL))
    };
    waits(200);
    assert_eq!(
        ppolls(&mut counters, &ebpf),
        (200, 200),
        "in the thread's slot"
    );
    let marks = crate::probes::kernel::mapped::MappedArray::map(
        &ebpf,
        syscall_waits::MARKS_MAP,
        MARK_SLOTS,
        size_of::<PpollMark>(),
    )
    .unwrap();
    let owner = marks
        .u64_at(mark_slot(tid), offset_of!(PpollMark, owner))
        .unwrap();
    let armed = marks
        .u64_at(mark_slot(tid), offset_of!(PpollMark, armed))
        .unwrap();
    assert_eq!(owner.load(Ordering::Relaxed), PpollMark::owner_of(tid, pid));
    let ppoll_marks = syscall_waits::PpollMarks::open(&ebpf).unwrap();
    // A mark left behind (as by a wait in flight when a budget pause took the probes) is
    // disarmed on resume; the slot stays the thread's.
    armed.store(1, Ordering::Relaxed);
    ppoll_marks.disarm_threads(pid, [tid]);
    assert_eq!(armed.load(Ordering::Relaxed), 0);
    assert_eq!(owner.load(Ordering::Relaxed), PpollMark::owner_of(tid, pid));
    // Forgetting the process frees its threads' slots.
    ppoll_marks.free_process(pid);
    assert_eq!(owner.load(Ordering::Relaxed), 0);
    // The slot held by another thread: the marks go to `PENDING`, as exact.
    let other = PpollMark::owner_of(tid.wrapping_add(MARK_SLOTS), pid + 1);
    owner.store(other, Ordering::Relaxed);
    waits(200);
    assert_eq!(ppolls(&mut counters, &ebpf), (400, 400), "in PENDING");
    assert_eq!(owner.load(Ordering::Relaxed), other, "not claimed");
    // A mark left in `PENDING` is cleared on resume too, and the entry kept.
    let pending_of = |ebpf: &Ebpf| {
        aya::maps::HashMap::<_, u32, profiler_common::PendingWait>::try_from(
            ebpf.map(syscall_waits::PENDING_MAP).unwrap(),
        )
        .unwrap()
        .get(&tid, 0)
        .unwrap()
    };
    let left = profiler_common::PendingWait {
        syscall: wait_syscall::PPOLL,
        ..pending_of(&ebpf)
    };
    aya::maps::HashMap::<_, u32, profiler_common::PendingWait>::try_from(
        ebpf.map_mut(syscall_waits::PENDING_MAP).unwrap(),
    )
    .unwrap()
    .insert(tid, left, 0)
    .unwrap();
    syscall_waits::clear_pending(&mut ebpf, pid, [tid]);
    assert_eq!(pending_of(&ebpf).syscall, wait_syscall::NONE);
    owner.store(0, Ordering::Relaxed);
    libc.detach(&mut ebpf, pid);
    drop(hrtimers.release_starts(&mut ebpf, pid));
    table.remove(&mut ebpf, pid).unwrap();
    syscall_waits::forget_process(&mut ebpf, pid);
    counters.forget(&mut ebpf, pid).unwrap();
}

fn a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back(multi_links: bool) {
    let (_one_at_a_time, mut ebpf) = root_test!("root_a_budget_pause_detaches_every_symbols_link");
    let (mut symbols, _sleeper, pid, entry, before) =
        source_and_sleeper(&mut ebpf, multi_links, SymbolSource::load);
    let exe = analyzed_exe(pid);
    let points = two_points(entry, entry);
    symbols
        .attach_dispatch_at(&mut ebpf, pid, &exe, &points, 0)
        .unwrap();
    let attached = probe_fds();
    assert!(attached > before);
    for _ in 0..3 {
        // The links are handed out, to be closed elsewhere; closing them detaches.
        drop(symbols.pause(&mut ebpf, pid));
        assert_eq!(probe_fds(), before, "a link survived the pause");
        assert!(!symbols.dispatch_attached(pid));
        symbols.resume(&mut ebpf, pid, 0).unwrap();
        assert_eq!(probe_fds(), attached, "resume brings back what was there");
        assert!(symbols.dispatch_attached(pid));
    }
    symbols.detach(&mut ebpf, pid);
    assert_eq!(probe_fds(), before);
}

fn a_usdt_attach_that_fails_part_way_leaves_nothing(multi_links: bool) {
    let (_one_at_a_time, mut ebpf) =
        root_test!("root_a_usdt_attach_that_fails_part_way_leaves_nothing");
    let (mut usdt, _sleeper, pid, entry, before) =
        source_and_sleeper(&mut ebpf, multi_links, UsdtSource::load);

    // The first site attaches; the second is past the end of the file.
    let site = |file_offset, semaphore_file_offset| SiteToAttach {
        file_offset,
        spec: spec(),
        semaphore_file_offset,
        semaphore_address: None,
        process_independent: true,
    };
    let sites = [site(entry, None), site(1 << 40, None)];
    let err = usdt.attach_sites(&mut ebpf, pid, &sites, 0).unwrap_err();
    assert!(format!("{err:#}").contains("0x10000000000"), "{err:#}");
    assert_eq!(probe_fds(), before, "a uprobe was left attached");
    assert_eq!(spec_entries(&mut ebpf), 0, "a spec was left in {SPECS_MAP}");
    assert!(!usdt.is_attached(pid));

    // The first site attaches, the second's semaphore cannot be one (an odd offset).
    let err = usdt
        .attach_sites(
            &mut ebpf,
            pid,
            &[site(entry, None), site(entry, Some(0x1001))],
            0,
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("semaphore"), "{err:#}");
    assert_eq!(probe_fds(), before);
    assert_eq!(spec_entries(&mut ebpf), 0);

    // And a good attach holds its uprobe and its spec, until detached.
    let how = usdt.attach_sites(&mut ebpf, pid, &sites[..1], 0).unwrap();
    assert_eq!(how, usdt::SemaphoreManagement::Kernel);
    assert!(probe_fds() > before);
    assert_eq!(spec_entries(&mut ebpf), 1);
    usdt.detach(&mut ebpf, pid);
    assert_eq!(probe_fds(), before);
    assert_eq!(spec_entries(&mut ebpf), 0);
}

fn a_symbols_attach_that_fails_part_way_leaves_nothing(multi_links: bool) {
    let (_one_at_a_time, mut ebpf) =
        root_test!("root_a_symbols_attach_that_fails_part_way_leaves_nothing");
    let (mut symbols, _sleeper, pid, entry, before) =
        source_and_sleeper(&mut ebpf, multi_links, SymbolSource::load);
    let exe = analyzed_exe(pid);
    // The second is past the end of the file.
    let points = two_points(entry, 1 << 40);
    assert!(
        symbols
            .attach_dispatch_at(&mut ebpf, pid, &exe, &points, 0)
            .is_err()
    );
    assert_eq!(probe_fds(), before, "a {DISPATCH_PROGRAM} uprobe was left");
    assert!(!symbols.dispatch_attached(pid));
    symbols
        .attach_dispatch_at(&mut ebpf, pid, &exe, &points[..1], 0)
        .unwrap();
    assert!(symbols.dispatch_attached(pid));
    symbols.detach(&mut ebpf, pid);
    assert_eq!(probe_fds(), before);
}

#[test]
fn root_a_paused_generations_links_count_nothing_and_a_resume_counts_once() {
    a_paused_generations_links_count_nothing_and_a_resume_counts_once(false);
}

#[test]
fn root_a_paused_generations_links_count_nothing_and_a_resume_counts_once_with_multi_links() {
    if multi_links_missing(
        "root_a_paused_generations_links_count_nothing_and_a_resume_counts_once_with_multi_links",
    ) {
        return;
    }
    a_paused_generations_links_count_nothing_and_a_resume_counts_once(true);
}

#[test]
fn root_a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back() {
    a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back(false);
}

#[test]
fn root_a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back_with_multi_links() {
    if multi_links_missing(
        "root_a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back_with_multi_links",
    ) {
        return;
    }
    a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back(true);
}

#[test]
fn root_a_usdt_attach_that_fails_part_way_leaves_nothing() {
    a_usdt_attach_that_fails_part_way_leaves_nothing(false);
}

#[test]
fn root_a_usdt_attach_that_fails_part_way_leaves_nothing_with_multi_links() {
    if multi_links_missing("root_a_usdt_attach_that_fails_part_way_leaves_nothing_with_multi_links")
    {
        return;
    }
    a_usdt_attach_that_fails_part_way_leaves_nothing(true);
}

#[test]
fn root_a_symbols_attach_that_fails_part_way_leaves_nothing() {
    a_symbols_attach_that_fails_part_way_leaves_nothing(false);
}

#[test]
fn root_a_symbols_attach_that_fails_part_way_leaves_nothing_with_multi_links() {
    if multi_links_missing(
        "root_a_symbols_attach_that_fails_part_way_leaves_nothing_with_multi_links",
    ) {
        return;
    }
    a_symbols_attach_that_fails_part_way_leaves_nothing(true);
}

/// Binary-wide links: two processes of one binary share one link per batch of points; a
/// point already held is not linked again, nor with another cookie; and the points' links
/// outlive the VMs that asked for them (only the profiler's end closes them).
#[test]
fn root_processes_of_one_binary_share_binary_wide_links() {
    if multi_links_missing("root_processes_of_one_binary_share_binary_wide_links") {
        return;
    }
    let (_one_at_a_time, ebpf) = root_test!("root_processes_of_one_binary_share_binary_wide_links");
    let programs = [DISPATCH_PROGRAM];
    let multi = uprobe_multi::MultiPrograms::load(&ebpf, object::EBPF_OBJECT, &programs)
        .unwrap()
        .shared_per_binary();
    let ((a, entry), (b, _)) = (sleeper(), sleeper());
    let exe = |s: &Sleeper| std::path::PathBuf::from(format!("/proc/{}/exe", s.0.id()));
    let point = |offset, cookie| shared_links::SharedPoint {
        offset,
        cookie,
        ref_ctr_offset: 0,
    };
    let before = probe_fds();
    let program = DISPATCH_PROGRAM;
    let first = multi
        .link_shared(program, &exe(&a), &[point(entry, 7)], false)
        .unwrap();
    let again = multi
        .link_shared(program, &exe(&b), &[point(entry, 7)], false)
        .unwrap();
    assert!(
        Arc::ptr_eq(&first[0], &again[0]),
        "the second process shares the link"
    );
    assert_eq!((multi.shared_links(), probe_fds()), (1, before + 1));
    let err = multi
        .link_shared(program, &exe(&b), &[point(entry, 8)], false)
        .unwrap_err();
    assert!(format!("{err:#}").contains("another cookie"), "{err:#}");
    // One point held, one new (the entry's second instruction): the new one gets a link of
    // its own.
    let code = std::fs::read(exe(&b)).unwrap();
    let second = entry
        + match &code[entry as usize..entry as usize + 4] {
            [0xf3, 0x0f, 0x1e, 0xfa] => 4, // endbr64
            [0x31, 0xed, ..] => 2,         // xor %ebp,%ebp
            other => panic!("an entry point that starts with {other:x?}"),
        };
    let both = multi
        .link_shared(
            program,
            &exe(&b),
            &[point(entry, 7), point(second, 9)],
            false,
        )
        .unwrap();
    assert_eq!(both.len(), 2);
    assert_eq!((multi.shared_links(), probe_fds()), (2, before + 2));
    drop((first, again, both, a, b));
    assert_eq!(
        probe_fds(),
        before + 2,
        "links stay while the profiler runs"
    );
    drop(multi);
    assert_eq!(probe_fds(), before);
}
