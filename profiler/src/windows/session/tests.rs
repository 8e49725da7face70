use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    rc::Rc,
};

use chrono::{DateTime, Utc};
use profiler_common::kind;

use super::*;
use crate::{
    attribution::RegionLabel,
    identity::threads::{KernelWorkerSample, ThreadRole, ThreadSample},
    identity::{cmdline::Accel, discovery::CpuTicks},
    offer::policy::ReadWriteUnavailable,
    probes::{AttachedVm as Watched, NameSources},
    record::PartialReason,
};

/// Counters per pid, as a test sets them; shared with the fake probes.
type Kernel = Rc<RefCell<HashMap<u32, RawCounters>>>;

/// Probes over a fake kernel: watching starts a process's counters from zero, as the
/// real layer does; everything it was asked is logged.
struct FakeProbes {
    kernel: Kernel,
    watched: BTreeSet<u32>,
    log: Vec<String>,
    read_write: HashMap<u32, ReadWriteSource>,
    /// Cumulative updates the fake COUNTERS map refused.
    dropped: Rc<std::cell::Cell<u64>>,
    /// Times the counters were read.
    reads: usize,
}

impl FakeProbes {
    /// KVM guests get the kvm tracepoints; others what the test set.
    fn watch_sources(&self, vm: &QemuProcess) -> Watched {
        let pid = vm.key.pid;
        let read_write = match (self.read_write.get(&pid), vm.identity.accel) {
            (Some(source), _) => Ok(*source),
            (None, Accel::Kvm) => Ok(ReadWriteSource::KvmTracepoints),
            (None, _) => Err(ReadWriteUnavailable::NoUsdtStripped),
        };
        let notes = if read_write.is_err() {
            vec![Note::vm(&vm.identity.name, "usdt source not used: test")]
        } else {
            Vec::new()
        };
        Watched {
            sources: VmSources {
                read_write,
                callbacks: Ok(()),
                timer: Ok(crate::offer::policy::TimerSource::LibcUprobes),
                guest: crate::offer::policy::GuestSources::plan(
                    vm.identity.accel,
                    &crate::offer::kernel::KernelOffer::all(),
                ),
            },
            names: NameSources::default(),
            notes,
        }
    }
}

impl ProbeLayer for FakeProbes {
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<Watched> {
        let pid = vm.key.pid;
        self.log.push(format!("watch {pid}"));
        self.watched.insert(pid);
        self.kernel.borrow_mut().remove(&pid);
        Ok(self.watch_sources(vm))
    }
    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<Watched> {
        self.log
            .push(format!("replan {} {}", vm.key.pid, vm.identity.accel));
        let mut w = self.watch_sources(vm);
        w.notes.clear();
        Ok(w)
    }
    fn unwatch(&mut self, pid: u32) -> anyhow::Result<()> {
        self.log.push(format!("unwatch {pid}"));
        self.watched.remove(&pid);
        self.kernel.borrow_mut().remove(&pid);
        Ok(())
    }
    fn refresh(&mut self) -> Vec<Note> {
        Vec::new()
    }
    fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>> {
        self.reads += 1;
        Ok(self
            .kernel
            .borrow()
            .iter()
            .filter(|(pid, _)| self.watched.contains(pid))
            .map(|(pid, c)| (*pid, c.clone()))
            .collect())
    }
    fn cost(&self) -> ProbeCost {
        ProbeCost::default()
    }
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        vec![("COUNTERS", self.dropped.get()), ("PENDING", 0)]
    }
    fn set_probing(&mut self, pid: u32, on: bool) -> anyhow::Result<std::time::Duration> {
        self.log
            .push(format!("probing {pid} {}", if on { "on" } else { "off" }));
        Ok(std::time::Duration::ZERO)
    }
    fn uprobe_hit_cost(&mut self) -> anyhow::Result<crate::windows::budget::HitCost> {
        Ok(crate::windows::budget::HitCost {
            tight: 1e-6,
            after_sleep: 1e-6,
        })
    }
}

/// Threads per pid and kernel workers, as a test sets them; and the times they were read.
#[derive(Default)]
struct FakeThreads {
    threads: HashMap<u32, Vec<ThreadSample>>,
    workers: Vec<KernelWorkerSample>,
    reads: u32,
}

/// Processes (and their threads) as a test sets them, and what discovery read of them.
struct FakeHost {
    processes: Rc<RefCell<Vec<QemuProcess>>>,
    threads: Rc<RefCell<FakeThreads>>,
    /// The processes of the last scan.
    scanned: Vec<VmKey>,
    /// Each one's CPU time as last read (at a scan, or at a refresh that found nothing
    /// changed), and that of those the last scan found gone.
    cpu_read: HashMap<u32, CpuTicks>,
    gone_cpu: HashMap<u32, CpuTicks>,
}

impl FakeHost {
    fn read_cpu(&mut self) {
        self.cpu_read = self
            .processes
            .borrow()
            .iter()
            .map(|p| (p.key.pid, p.cpu))
            .collect();
    }
}

impl Discover for FakeHost {
    fn scan(&mut self) -> Vec<QemuProcess> {
        let found = self.processes.borrow().clone();
        self.scanned = found.iter().map(|p| p.key).collect();
        let running = |pid: &u32| found.iter().any(|p| p.key.pid == *pid);
        self.gone_cpu = self
            .cpu_read
            .drain()
            .filter(|(pid, _)| !running(pid))
            .collect();
        self.read_cpu();
        found
    }
    fn unchanged(&mut self, _execs: Option<&[u32]>) -> bool {
        let now = self
            .processes
            .borrow()
            .iter()
            .map(|p| p.key)
            .collect::<Vec<_>>();
        let same = now == self.scanned;
        if same {
            self.read_cpu();
        }
        same
    }
    fn exit_cpu(&mut self, pid: u32) -> Option<CpuTicks> {
        self.gone_cpu.remove(&pid)
    }
    fn threads(
        &mut self,
        pid: u32,
        _settled: &HashMap<u32, ThreadRole>,
    ) -> Option<Vec<ThreadSample>> {
        self.threads.borrow().threads.get(&pid).cloned()
    }
    fn kernel_workers(&mut self) -> Vec<KernelWorkerSample> {
        let mut t = self.threads.borrow_mut();
        t.reads += 1;
        t.workers.clone()
    }
}

fn qemu(pid: u32, start_ticks: u64, name: &str) -> QemuProcess {
    crate::identity::fixtures::process(pid, start_ticks, name)
}

struct Rig {
    kernel: Kernel,
    host: Rc<RefCell<Vec<QemuProcess>>>,
    threads: Rc<RefCell<FakeThreads>>,
    session: Session<FakeProbes, FakeHost>,
}

fn rig(filter: VmFilter, read_write: &[(u32, ReadWriteSource)]) -> Rig {
    let kernel: Kernel = Rc::default();
    let host: Rc<RefCell<Vec<QemuProcess>>> = Rc::default();
    let probes = FakeProbes {
        kernel: kernel.clone(),
        watched: BTreeSet::new(),
        log: Vec::new(),
        read_write: read_write.iter().copied().collect(),
        dropped: Rc::default(),
        reads: 0,
    };
    let collector = Collector::new(
        10.0,
        "2026-11-22T00:00:00Z".parse::<DateTime<Utc>>().unwrap(),
        100,
    );
    let threads: Rc<RefCell<FakeThreads>> = Rc::default();
    Rig {
        kernel: kernel.clone(),
        host: host.clone(),
        threads: threads.clone(),
        session: Session::with_discovery(
            probes,
            FakeHost {
                processes: host,
                threads,
                scanned: Vec::new(),
                cpu_read: HashMap::new(),
                gone_cpu: HashMap::new(),
            },
            collector,
            filter,
        ),
    }
}

impl Rig {
    fn set_timer(&self, pid: u32, n: u64) {
        self.kernel
            .borrow_mut()
            .entry(pid)
            .or_default()
            .by_key
            .insert((kind::TIMER, 1), n);
    }
    fn log(&self) -> Vec<String> {
        self.session.probes().log.clone()
    }
}

#[test]
fn new_vms_are_watched_once_and_count_from_zero() {
    let mut r = rig(VmFilter::default(), &[]);
    r.host.borrow_mut().push(qemu(10, 1, "a"));
    // Events before the profiler watched the VM do not count.
    r.set_timer(10, 500);
    let report = r.session.sample(0.0).unwrap();
    assert!(report.closed.is_empty());
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    r.set_timer(10, 40);
    r.session.sample(5.0).unwrap();
    r.set_timer(10, 100);
    let report = r.session.sample(10.0).unwrap();
    assert_eq!(r.log(), ["watch 10"]);
    assert_eq!(report.closed.len(), 1);
    assert_eq!(report.closed[0].timer, Some(100));
    assert!(report.notes.is_empty(), "notes are said once");
    assert!(
        report.closed[0]
            .sources
            .read
            .starts_with("unavailable: stripped")
    );
}

/// Between window boundaries, `sample_changes` reads the VMs only when one starts or exits,
/// and closes the same windows as reading every VM each second.
#[test]
fn sampling_only_changes_closes_the_windows_sampling_every_vm_closes() {
    let mut every = rig(VmFilter::default(), &[]);
    let mut changes = rig(VmFilter::default(), &[]);
    let mut read_at = Vec::new();
    for t in 0..=25u32 {
        let mut closed = Vec::new();
        for (r, only_changes) in [(&mut every, false), (&mut changes, true)] {
            let mut host = r.host.borrow_mut();
            if t == 0 {
                host.push(qemu(10, 1, "a"));
            }
            if t == 4 {
                host.push(qemu(11, 1, "b"));
            }
            if t == 13 {
                host.retain(|p| p.key.pid != 10);
            }
            for p in host.iter_mut() {
                p.cpu = CpuTicks(u64::from(t) * u64::from(p.key.pid));
            }
            drop(host);
            for pid in [10, 11] {
                r.set_timer(pid, u64::from(t) * u64::from(pid));
            }
            let before = r.session.probes().reads;
            let report = if only_changes {
                r.session.sample_changes(f64::from(t)).unwrap()
            } else {
                r.session.sample(f64::from(t)).unwrap()
            };
            if only_changes && r.session.probes().reads > before {
                assert!(report.every_vm);
                read_at.push(t);
            }
            closed.push(report.closed);
        }
        assert_eq!(closed[0], closed[1], "at {t} s");
        if t == 13 {
            // Its CPU time up to 12 s (ticks 10 a second, 100 a second in the rig's clock),
            // though every VM was last read at 10 s.
            assert_eq!(closed[1].len(), 1);
            assert_eq!(closed[1][0].cpu_seconds, Some(0.2));
        }
    }
    assert_eq!(read_at, [0, 4, 10, 13, 20]);
    let last = |r: &mut Rig| {
        let mut closed = r.session.sample_last(25.5).unwrap().closed;
        closed.extend(r.session.finish(25.5));
        closed
    };
    let (a, b) = (last(&mut every), last(&mut changes));
    assert_eq!(a.len(), 1);
    assert_eq!(a, b);
}

/// A QEMU whose vCPU thread spent `vcpu` ticks and main thread `main`, with a kernel worker
/// outside it at `pit` ticks, and its process CPU time (stat) at `process`.
fn set_threads(r: &Rig, vcpu: u64, main: u64, pit: u64, process: u64) {
    let thread = |tid, role, ticks| ThreadSample {
        tid,
        role,
        settled: true,
        ticks,
        guest_ticks: 0,
    };
    let mut t = r.threads.borrow_mut();
    t.threads.insert(
        10,
        vec![
            thread(10, ThreadRole::DeviceModel, main),
            thread(12, ThreadRole::Vcpu, vcpu),
        ],
    );
    t.workers = vec![KernelWorkerSample {
        owner: 10,
        tid: 11,
        ticks: pit,
    }];
    r.host.borrow_mut()[0].cpu = crate::identity::discovery::CpuTicks(process);
}

#[test]
fn threads_are_read_at_window_boundaries_and_split_the_window_cpu() {
    let mut r = rig(VmFilter::default(), &[]);
    r.host.borrow_mut().push(qemu(10, 1, "a"));
    set_threads(&r, 1000, 50, 7, 1060);
    r.session.sample(0.0).unwrap();
    for t in 1..10 {
        set_threads(&r, 1000 + 25 * t, 50 + t, 7 + t, 1060 + 27 * t);
        assert!(r.session.sample(t as f64).unwrap().closed.is_empty());
    }
    assert_eq!(
        r.threads.borrow().reads,
        1,
        "only at the first sample so far"
    );
    set_threads(&r, 1250, 60, 17, 1330);
    let closed = r.session.sample(10.0).unwrap().closed;
    assert_eq!(r.threads.borrow().reads, 2);
    let split = closed[0].cpu_by_role.expect("read at both ends");
    assert_eq!(closed[0].cpu_seconds, Some(2.7));
    assert_eq!((split.vcpu, split.device_model), (2.5, 0.1));
    assert_eq!((split.other, split.kernel_workers), (0.1, 0.1));
    assert_eq!(split.vcpu_threads, 1);
    // The stop reads them again, for the partial window it closes.
    set_threads(&r, 1300, 61, 18, 1382);
    let mut closed = r.session.sample_last(12.0).unwrap().closed;
    closed.extend(r.session.finish(12.0));
    assert_eq!(closed[0].cpu_by_role.unwrap().vcpu, 0.5);
}

#[test]
fn dropped_updates_stamp_the_window_they_happened_in_and_are_said_once() {
    let mut r = rig(VmFilter::default(), &[]);
    r.host.borrow_mut().push(qemu(10, 1, "a"));
    r.session.sample(0.0).unwrap();
    let dropped = r.session.probes().dropped.clone();
    dropped.set(7);
    let notes = r.session.sample(4.0).unwrap().notes;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].to_string().contains("7 by COUNTERS"),
        "{}",
        notes[0]
    );
    dropped.set(9);
    assert!(
        r.session.sample(8.0).unwrap().notes.is_empty(),
        "once per window"
    );
    let report = r.session.sample(10.0).unwrap();
    assert_eq!(report.closed[0].dropped_updates, 9);
    // The next window lost nothing, and its record says so by leaving the field out.
    let report = r.session.sample(20.0).unwrap();
    assert_eq!(report.closed[0].dropped_updates, 0);
    let line = serde_json::to_string(&report.closed[0]).unwrap();
    assert!(!line.contains("dropped_updates"), "{line}");
    dropped.set(10);
    let closed = r.session.finish(25.0);
    assert_eq!(closed[0].dropped_updates, 0, "not sampled before the stop");
}

/// A VM whose waits (libc uprobes, two hits each) would cost 4 % of a core under a 1 %
/// budget is probed for a block of a quarter of each window (rounded up), and its window
/// is scaled and marked.
/// Under a budget, once a binary runs more VMs than per-VM links serve well, a note says so
/// once; the same crowd without a budget says nothing.
#[test]
fn a_budget_over_a_crowd_of_one_binary_is_said_once() {
    for budget in [None, Some(1.0)] {
        let mut r = rig(VmFilter::default(), &[]);
        r.session = std::mem::replace(&mut r.session, rig(VmFilter::default(), &[]).session)
            .with_overhead_budget(budget)
            .unwrap();
        let n = BUDGETED_VMS_PER_BINARY as u32 + 1;
        r.host
            .borrow_mut()
            .extend((0..n).map(|i| qemu(100 + i, 1, &format!("vm{i}"))));
        let said = |notes: &[Note]| {
            notes
                .iter()
                .filter(|n| n.to_string().contains("budgeted VMs run"))
                .count()
        };
        let first = r.session.sample(0.0).unwrap().notes;
        let second = r.session.sample(1.0).unwrap().notes;
        let expected = usize::from(budget.is_some());
        assert_eq!((said(&first), said(&second)), (expected, 0), "{first:?}");
        if budget.is_some() {
            crate::testing::assert_contains(
                &first.iter().map(ToString::to_string).collect::<String>(),
                &format!("{n} budgeted VMs run /usr/bin/qemu-system-x86_64"),
            );
        }
    }
}

#[test]
fn a_budget_duty_cycles_a_busy_vm_and_scales_its_window() {
    let mut r = rig(VmFilter::default(), &[]);
    r.session = std::mem::replace(&mut r.session, rig(VmFilter::default(), &[]).session)
        .with_overhead_budget(Some(1.0))
        .unwrap();
    r.host.borrow_mut().push(qemu(10, 1, "busy"));
    r.session.sample(0.0).unwrap();
    let mut timer = 0;
    let mut probing = true;
    for t in 1..=10 {
        // 20,000 waits a second while probed, none counted while paused.
        if probing {
            timer += 20_000;
        }
        r.set_timer(10, timer);
        // The programs count their own runs: an entry and a return per wait.
        r.kernel
            .borrow_mut()
            .get_mut(&10)
            .unwrap()
            .by_key
            .insert((kind::UPROBE_HIT, 0), 2 * timer);
        let report = r.session.sample(f64::from(t)).unwrap();
        probing = r
            .log()
            .iter()
            .rev()
            .find(|l| l.starts_with("probing 10"))
            .is_none_or(|l| l.ends_with("on"));
        if t == 10 {
            let w = &report.closed[0];
            assert!(w.estimated, "{w:?}");
            let probed = w.probed_seconds.unwrap();
            assert!((2.0..=4.0).contains(&probed), "{probed}");
            // The estimate is the rate while probed times the window.
            assert_eq!(w.timer, Some(200_000), "{w:?}");
        }
    }
    // One block per window: off once the block is over, on again at the next window.
    assert_eq!(
        r.log(),
        ["watch 10", "probing 10 off", "probing 10 on"],
        "{:?}",
        r.log()
    );
    // Without a budget nothing is paused.
    let mut plain = rig(VmFilter::default(), &[]);
    plain.host.borrow_mut().push(qemu(10, 1, "busy"));
    for t in 0..=10 {
        plain.set_timer(10, 20_000 * t);
        plain.session.sample(t as f64).unwrap();
    }
    assert_eq!(plain.log(), ["watch 10"]);
}

#[test]
fn an_exited_vm_keeps_its_last_counts_and_is_unwatched() {
    let mut r = rig(VmFilter::default(), &[(10, ReadWriteSource::Usdt)]);
    r.host.borrow_mut().push(qemu(10, 1, "a"));
    r.session.sample(0.0).unwrap();
    r.set_timer(10, 30);
    {
        let mut k = r.kernel.borrow_mut();
        let c = k.get_mut(&10).unwrap();
        c.by_key.insert((kind::READ, 0x77), 12);
        c.regions
            .insert(0x77, RegionLabel::Named("parallel".into()));
    }
    r.session.sample(1.0).unwrap();
    // Events after the last sample, then the VM exits.
    r.set_timer(10, 45);
    r.host.borrow_mut().clear();
    let report = r.session.sample(2.0).unwrap();
    assert_eq!(r.log(), ["watch 10", "unwatch 10"]);
    assert_eq!(report.closed.len(), 1);
    let w = &report.closed[0];
    assert_eq!(w.partial_reason, Some(PartialReason::VmExited));
    assert_eq!((w.timer, w.read), (Some(45), Some(12)));
    assert_eq!(w.devices[0].name, "parallel");
    assert_eq!(w.sources.read, "usdt");
    assert!(r.session.running().is_empty());
    // The cumulative view (what `serve` exports) has the final counts too.
    assert!(r.session.observations().is_empty());
    let exits = r.session.exits();
    assert_eq!(exits.len(), 1);
    assert_eq!(
        (exits[0].totals.counts.timer, exits[0].totals.counts.read),
        (Some(45), Some(12))
    );
}

#[test]
fn a_reused_pid_is_a_new_vm() {
    let mut r = rig(VmFilter::default(), &[]);
    r.host.borrow_mut().push(qemu(10, 1, "old"));
    r.session.sample(0.0).unwrap();
    r.set_timer(10, 7);
    // Same PID, another start time: the old QEMU exited, a new one took its PID.
    *r.host.borrow_mut() = vec![qemu(10, 2, "new")];
    let report = r.session.sample(1.0).unwrap();
    assert_eq!(r.log(), ["watch 10", "unwatch 10", "watch 10"]);
    assert_eq!(report.closed.len(), 1);
    assert_eq!(report.closed[0].vm.name, "old");
    assert_eq!(report.closed[0].timer, Some(7));
    let running = r.session.running();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].identity.name, "new");
    assert_eq!(running[0].activity.counts.timer, Some(0));
}

#[test]
fn a_selection_that_matches_nothing_is_said_each_window_until_a_vm_appears() {
    let mut r = rig(
        VmFilter {
            names: vec!["web01".into()],
            pids: Vec::new(),
        },
        &[],
    );
    let said = |report: &SampleReport| {
        report
            .notes
            .iter()
            .any(|n| n.text.starts_with("no QEMU process matches --vm web01"))
    };
    assert!(said(&r.session.sample(0.0).unwrap()));
    assert!(!said(&r.session.sample(5.0).unwrap()), "once per window");
    assert!(
        said(&r.session.sample(10.0).unwrap()),
        "again in the next window"
    );
    assert!(!r.session.ever_matched());
    r.host.borrow_mut().push(qemu(10, 1, "web01"));
    r.session.sample(11.0).unwrap();
    assert!(r.session.ever_matched());
    r.host.borrow_mut().clear();
    assert!(!said(&r.session.sample(20.0).unwrap()), "it did match once");
}

#[test]
fn a_vm_that_turns_out_to_be_kvm_gets_its_sources_again_and_keeps_its_counts() {
    let mut r = rig(VmFilter::default(), &[]);
    r.host.borrow_mut().push(qemu(10, 1, "a"));
    let report = r.session.sample(0.0).unwrap();
    assert_eq!(report.notes.len(), 1, "stripped TCG: {:?}", report.notes);
    r.set_timer(10, 4);
    // The next look finds /dev/kvm open.
    std::sync::Arc::make_mut(&mut r.host.borrow_mut()[0].identity).accel = Accel::Kvm;
    let report = r.session.sample(1.0).unwrap();
    assert_eq!(r.log(), ["watch 10", "replan 10 kvm"]);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.text.starts_with("runs under kvm (it was tcg")),
        "{:?}",
        report.notes
    );
    r.set_timer(10, 9);
    let closed = r.session.sample(10.0).unwrap().closed;
    assert_eq!(closed[0].sources.read, "kvm-tracepoints");
    assert_eq!(closed[0].timer, Some(9), "counts kept across the re-plan");
    // Once settled, no more re-planning.
    r.session.sample(11.0).unwrap();
    assert_eq!(r.log().len(), 2);
}

#[test]
fn only_selected_vms_are_watched() {
    let mut r = rig(
        VmFilter {
            names: vec!["b".into()],
            pids: vec![30],
        },
        &[],
    );
    *r.host.borrow_mut() = vec![qemu(10, 1, "a"), qemu(20, 1, "b"), qemu(30, 1, "c")];
    r.session.sample(0.0).unwrap();
    assert_eq!(r.log(), ["watch 20", "watch 30"]);
    assert_eq!(r.session.processes().len(), 2);
    assert_eq!(
        r.session.live_sources(),
        ["libc uprobes (timer, fd)", "uprobes timer callbacks"]
    );
}
