//! The overhead budget (`--max-overhead PCT`): how much of a core the probes may cost one
//! VM's QEMU, and the duty cycle that keeps a busy VM within it.
//!
//! A uprobe costs the probed process a trap per hit. When a VM's hits would cost more than the
//! budget, its uprobes are attached only for some refresh intervals of each window (evenly
//! spread, by a credit counter) and its counts are scaled by the share of the window they
//! were on, and marked estimated. Kernel tracepoints (KVM, the syscall fallback) are not
//! duty-cycled. What a hit costs is measured at start-up in the profiler's own loop, then
//! learned per VM from its QEMU's CPU time with the probes on and off in each window (a hit in
//! QEMU, after a sleep and among its other work, cost about twice the start-up figure here).
//! Pure: the session feeds it hits, CPU times and times.

pub use crate::probes::HitCost;

/// The budget: a fraction of one core per VM, and what one uprobe hit costs on this host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverheadBudget {
    /// Fraction of one core (0.01 = 1 %).
    pub max_fraction: f64,
    /// Seconds of the probed thread's time per uprobe hit, measured at start: what a VM is
    /// reckoned to pay until its own CPU time says ([`HitCost::start`]).
    pub hit_cost: f64,
    /// The least a hit can cost (a trap with hot caches, [`HitCost::tight`]): the floor under
    /// what a VM's own CPU time shows, which its guest's own load can push towards 0.
    pub hit_cost_floor: f64,
}

impl OverheadBudget {
    pub fn new(max_fraction: f64, measured: HitCost) -> Self {
        Self {
            max_fraction,
            hit_cost: measured.start(),
            hit_cost_floor: measured.tight.min(measured.start()),
        }
    }
}

/// Never sample less than this share of a window: the counts still come from somewhere.
pub const MIN_DUTY: f64 = 0.05;

/// One VM's probing rate and the share of each window it can be probed for.
#[derive(Debug, Clone, PartialEq)]
pub struct DutyCycle {
    /// Hits per second while probing, smoothed (`None`: not measured yet).
    rate: Option<f64>,
    /// Seconds of its QEMU's CPU per hit, learned from its CPU time with and without the
    /// probes ([`DutyCycle::calibrated`]), smoothed.
    learned_cost: Option<f64>,
    /// The share of time to probe.
    duty: f64,
    /// Runs per second (of the whole window) of its links that counted nothing: a pause's
    /// links until they are closed, a resume's until all are in. They cost the traps all
    /// the same, so they come out of the budget. Smoothed over windows.
    closing_rate: Option<f64>,
}

impl Default for DutyCycle {
    fn default() -> Self {
        Self {
            rate: None,
            learned_cost: None,
            duty: 1.0,
            closing_rate: None,
        }
    }
}

/// One VM's budget figures, for records' closing lines and `serve`'s gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DutyView {
    /// Uprobe hits per second while probed (smoothed).
    pub hits_per_second: f64,
    /// Seconds of its QEMU's CPU per hit, as the budget reckons it.
    pub hit_cost: f64,
    /// Whether `hit_cost` was learned from its QEMU's CPU time (else the start-up figure;
    /// a learned cost below the tight-loop figure counts as that figure).
    pub learned: bool,
    /// Fraction of a core the probes would cost it if always on.
    pub full_cost: f64,
    /// The share of time its probes are on.
    pub duty: f64,
    /// Runs per second (of the whole time) of its links while they counted nothing (closing
    /// after a pause, attaching at a resume), smoothed.
    pub closing_hits_per_second: f64,
    /// What those runs cost, as a fraction of a core, out of the budget.
    pub closing_cost: f64,
}

/// Weight of the newest measurement in the smoothed rate.
const SMOOTHING: f64 = 0.5;

/// `new` folded into the smoothed `old` (the first measurement stands alone).
fn smoothed(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |old| old + SMOOTHING * (new - old))
}

impl DutyCycle {
    /// The share of time the probes are on.
    pub fn duty(&self) -> f64 {
        self.duty
    }

    /// Hits per second while probing, as last measured (smoothed).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// What one hit costs this VM: what its own CPU time showed, once it has (never below the
    /// tight-loop figure), else the start-up measurement. (Once the start-up figure was also
    /// the floor: a start-up slowed by a busy neighbour then kept the budget over-cautious
    /// for the whole run, at half the duty it could have had.)
    pub fn hit_cost(&self, budget: &OverheadBudget) -> f64 {
        self.learned_cost.map_or(budget.hit_cost, |learned| {
            learned.max(budget.hit_cost_floor)
        })
    }

    /// Seconds of its QEMU's CPU per hit as learned from its CPU time, if learned yet (the
    /// figure [`Self::hit_cost`] uses when it is above the tight-loop one).
    pub fn learned_cost(&self) -> Option<f64> {
        self.learned_cost
    }

    /// What the budget knows of this VM, once its rate is measured.
    pub fn view(&self, budget: &OverheadBudget) -> Option<DutyView> {
        let hits_per_second = self.rate?;
        let hit_cost = self.hit_cost(budget);
        Some(DutyView {
            hits_per_second,
            hit_cost,
            learned: self.learned_cost.is_some(),
            full_cost: hits_per_second * hit_cost,
            duty: self.duty,
            closing_hits_per_second: self.closing_rate.unwrap_or(0.0),
            closing_cost: self.closing_cost(budget),
        })
    }

    /// Fraction of a core its links cost while counting nothing (0 until measured).
    pub fn closing_cost(&self, budget: &OverheadBudget) -> f64 {
        self.closing_rate.unwrap_or(0.0) * self.hit_cost(budget)
    }

    /// A window's runs of links that counted nothing: `hits` over its `secs`.
    pub fn closing_measured(&mut self, budget: &OverheadBudget, hits: u64, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let rate = hits as f64 / secs;
        self.closing_rate = Some(smoothed(self.closing_rate, rate));
        self.update_duty(budget);
    }

    /// The estimated cost, as a fraction of a core, of probing all the time.
    pub fn full_cost(&self, budget: &OverheadBudget) -> Option<f64> {
        self.rate.map(|r| r * self.hit_cost(budget))
    }

    /// `hits` made over `secs` of probing: updates the rate and the duty.
    pub fn measured(&mut self, budget: &OverheadBudget, hits: u64, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let rate = hits as f64 / secs;
        self.rate = Some(smoothed(self.rate, rate));
        self.update_duty(budget);
    }

    /// One window's CPU split: its QEMU used `on` of a core while probed and `off` while not
    /// (fractions, each over at least a second). Their difference over the hit rate is what a
    /// hit cost it there; a sample is kept between 0 and a hundred times the start-up figure
    /// (a guest's own load moves between the two spans too, and the smoothing averages that
    /// out over windows).
    pub fn calibrated(&mut self, budget: &OverheadBudget, on: f64, off: f64) {
        let Some(rate) = self.rate.filter(|r| *r > 0.0) else {
            return;
        };
        let cost = ((on - off) / rate).clamp(0.0, 100.0 * budget.hit_cost);
        self.learned_cost = Some(smoothed(self.learned_cost, cost));
        self.update_duty(budget);
    }

    fn update_duty(&mut self, budget: &OverheadBudget) {
        self.duty = match self.full_cost(budget) {
            Some(cost) if cost > budget.max_fraction => {
                // What the closing links cost is spent before any probing.
                let left = (budget.max_fraction - self.closing_cost(budget)).max(0.0);
                (left / cost).clamp(MIN_DUTY, 1.0)
            }
            _ => 1.0,
        };
    }

    /// Refresh intervals to probe at the start of a window of `intervals`: one block, so a
    /// window costs one pause and one resume (a pause takes the kernel a grace period per
    /// link), and at least one.
    pub fn block(&self, intervals: u32) -> u32 {
        ((self.duty * f64::from(intervals)).ceil() as u32).clamp(1, intervals.max(1))
    }
}

use std::collections::{BTreeMap, HashMap};

use profiler_common::kind;

use crate::{
    attribution::RawCounters,
    offer::policy::{ReadWriteSource, VmSources},
    windows::finish::Probed,
};

/// Which of a VM's counts come from uprobes (and are scaled when they are duty-cycled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uprobed {
    pub timer: bool,
    pub read_write: bool,
    pub callbacks: bool,
}

impl Uprobed {
    pub fn of(sources: &VmSources) -> Self {
        Self {
            timer: sources
                .timer
                .as_ref()
                .is_ok_and(|t| t.libc_probes().is_some()),
            read_write: matches!(
                sources.read_write,
                Ok(ReadWriteSource::Usdt | ReadWriteSource::Symbols)
            ),
            callbacks: sources.callbacks.is_ok(),
        }
    }

    pub fn any(self) -> bool {
        self.timer || self.read_write || self.callbacks
    }

    /// uprobe hits behind `raw`: one per device access (each read/write probe run counts
    /// one), plus the runs the wait and timer programs counted themselves
    /// ([`kind::UPROBE_HIT`]: wait entries and returns, `timer_mod`, callbacks), which no
    /// count of events can stand for (`timer_mod` runs, waits of classes not counted).
    pub fn hits(self, raw: &RawCounters) -> Hits {
        let mut live = raw.total(kind::UPROBE_HIT);
        if self.read_write {
            live += raw.total(kind::READ) + raw.total(kind::WRITE);
        }
        Hits {
            live,
            closing: raw.total(kind::CLOSING_HIT),
        }
    }
}

/// A VM's uprobe runs so far: those that counted, and those of links that counted nothing
/// ([`kind::CLOSING_HIT`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hits {
    pub live: u64,
    pub closing: u64,
}

impl From<u64> for Hits {
    fn from(live: u64) -> Self {
        Self { live, closing: 0 }
    }
}

/// One sample, as the duty cycles see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// Its time (seconds since the start) and the length of the interval it ends.
    pub t: f64,
    pub secs: f64,
    /// The window the next interval lies in, and how many refresh intervals a window has.
    pub window: u64,
    pub window_intervals: u32,
}

/// A span of profiler time in which a VM's uprobes were attached. A pause ends it when it is
/// asked for: closing a link removes its breakpoint at once (the grace period the kernel then
/// waits, about a second here, counts nothing).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Period {
    start: f64,
    end: Option<f64>,
}

impl Period {
    /// Seconds of overlap with `[from, to]`; a period not known to have ended lasts until `to`.
    fn overlap(&self, from: f64, to: f64) -> f64 {
        let end = self.end.unwrap_or(to);
        (end.min(to) - self.start.max(from)).max(0.0)
    }
}

/// One budgeted VM.
#[derive(Debug, Default)]
struct BudgetedVm {
    duty: DutyCycle,
    /// Cumulative hits at the last sample.
    last_hits: Option<Hits>,
    /// Its current window's closing hits and seconds so far.
    closing: (u64, f64),
    uprobed: Uprobed,
    /// Its uprobes are attached.
    on: bool,
    /// The window its intervals are being counted in, how many so far, and how many of them
    /// are to be probed.
    window: Option<u64>,
    intervals: u32,
    block: u32,
    /// Intervals of the window really probed so far: a resume that fails (its attach
    /// refused) moves the block later instead of losing it.
    probed: u32,
    /// The block was set before any rate was known (the VM's first window).
    provisional: bool,
    /// What scaling added to its closed windows so far.
    added: EstimateAddition,
    periods: Vec<Period>,
    /// Its QEMU's CPU seconds at the last sample.
    last_cpu: Option<f64>,
    /// Its current window's whole intervals, probed and not: CPU seconds and seconds.
    split: CpuSplit,
}

/// CPU time of a VM's QEMU over whole intervals with its probes on and off.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct CpuSplit {
    on_cpu: f64,
    on_secs: f64,
    off_cpu: f64,
    off_secs: f64,
}

impl CpuSplit {
    /// (CPU share probed, CPU share not), when both spans are at least a second.
    fn shares(&self) -> Option<(f64, f64)> {
        (self.on_secs >= 1.0 && self.off_secs >= 1.0)
            .then(|| (self.on_cpu / self.on_secs, self.off_cpu / self.off_secs))
    }
}

/// The duty cycles of every VM under a budget, and when each was probed.
#[derive(Debug)]
pub struct BudgetedVms {
    budget: OverheadBudget,
    vms: HashMap<u32, BudgetedVm>,
    /// What VMs that exited at the last sample had added (kept one sample, for `serve`).
    forgotten: HashMap<u32, EstimateAddition>,
}

impl BudgetedVms {
    pub fn new(budget: OverheadBudget) -> Self {
        Self {
            budget,
            vms: HashMap::new(),
            forgotten: HashMap::new(),
        }
    }

    pub fn budget(&self) -> OverheadBudget {
        self.budget
    }

    /// A sample at `tick`: VM `pid` (served as `uprobed`) has made `hits` uprobe hits so far,
    /// and its QEMU has used `cpu` seconds of CPU (if known). Returns whether its probes must
    /// go on (`Some(true)`) or off (`Some(false)`) for the next interval.
    pub fn observe(
        &mut self,
        pid: u32,
        uprobed: Uprobed,
        hits: impl Into<Hits>,
        cpu: Option<f64>,
        tick: Tick,
    ) -> Option<bool> {
        let Tick {
            t,
            secs,
            window,
            window_intervals,
        } = tick;
        let budget = self.budget;
        let hits = hits.into();
        let vm = self.vms.entry(pid).or_insert_with(|| BudgetedVm {
            on: true,
            ..BudgetedVm::default()
        });
        vm.uprobed = uprobed;
        let ended_on = vm.on;
        let last_cpu = std::mem::replace(&mut vm.last_cpu, cpu);
        let Some(last) = vm.last_hits.replace(hits) else {
            // Just watched: attached from now.
            vm.periods.push(Period {
                start: t,
                end: None,
            });
            vm.window = Some(window);
            vm.intervals = 1;
            vm.block = window_intervals;
            vm.provisional = true;
            return None;
        };
        let whole_on = vm.on && vm.periods.last().is_some_and(|p| p.start <= t - secs);
        let whole_off = !vm.on
            && vm
                .periods
                .last()
                .is_none_or(|p| p.end.is_some_and(|end| end <= t - secs));
        if let (Some(now), Some(before)) = (cpu, last_cpu)
            && secs > 0.0
        {
            let used = (now - before).max(0.0);
            if whole_on {
                vm.split.on_cpu += used;
                vm.split.on_secs += secs;
            } else if whole_off {
                vm.split.off_cpu += used;
                vm.split.off_secs += secs;
            }
        }
        vm.closing.0 += hits.closing.saturating_sub(last.closing);
        vm.closing.1 += secs;
        if whole_on {
            // A whole interval probed: a clean measurement.
            vm.duty
                .measured(&budget, hits.live.saturating_sub(last.live), secs);
            if vm.provisional && vm.window == Some(window) && uprobed.any() {
                // The first rate: the rest of the first window follows it too.
                vm.provisional = false;
                vm.block = vm.duty.block(window_intervals).max(vm.intervals);
            }
        }
        if ended_on && vm.window == Some(window) {
            vm.probed += 1;
        }
        if vm.window != Some(window) {
            // The window that ended had probed and unprobed spans: what the probes cost.
            if let Some((on, off)) = std::mem::take(&mut vm.split).shares() {
                vm.duty.calibrated(&budget, on, off);
            }
            let (closing, secs) = std::mem::take(&mut vm.closing);
            vm.duty.closing_measured(&budget, closing, secs);
            vm.window = Some(window);
            vm.intervals = 0;
            vm.probed = 0;
            vm.provisional = false;
            vm.block = if uprobed.any() {
                vm.duty.block(window_intervals)
            } else {
                window_intervals
            };
        }
        let want = vm.probed < vm.block;
        vm.intervals += 1;
        (want != vm.on).then_some(want)
    }

    /// The probes of `pid` went on at `t`, attached after `attach` seconds; or off at `t`.
    pub fn applied(&mut self, pid: u32, on: bool, t: f64, attach: f64) {
        let Some(vm) = self.vms.get_mut(&pid) else {
            return;
        };
        vm.on = on;
        if on {
            vm.periods.push(Period {
                start: t + attach,
                end: None,
            });
        } else if let Some(p) = vm.periods.last_mut() {
            p.end = Some(t);
        }
    }

    /// How long `pid`'s uprobes were on in `[from, to]` (a window's coverage), as its record
    /// is written ([`crate::windows::finish`]).
    pub fn probed(&self, pid: u32, from: f64, to: f64) -> Probed {
        match self.vms.get(&pid) {
            None => Probed::Throughout,
            Some(vm) => Probed::For {
                seconds: vm.periods.iter().map(|p| p.overlap(from, to)).sum(),
                uprobed: vm.uprobed,
            },
        }
    }

    /// Adds what scaling one of `pid`'s windows added (for `serve`'s counters).
    pub fn absorb(&mut self, pid: u32, added: &EstimateAddition) {
        if let Some(vm) = self.vms.get_mut(&pid) {
            vm.added.absorb(added);
        }
    }

    /// Before a sample's records are written: what the last sample's exited VMs had added has
    /// been read by now, and periods that ended before `forget_before` are no longer needed.
    pub fn next_sample(&mut self, forget_before: f64) {
        self.forgotten.clear();
        for vm in self.vms.values_mut() {
            vm.periods
                .retain(|p| p.end.is_none_or(|end| end >= forget_before));
        }
    }

    /// Forgets an exited VM (after its last records are written).
    pub fn forget(&mut self, pid: u32) {
        if let Some(vm) = self.vms.remove(&pid)
            && !vm.added.is_empty()
        {
            self.forgotten.insert(pid, vm.added);
        }
    }

    /// What scaling has added to each VM's closed windows so far (VMs with any estimated
    /// window): `(pid, exited at the last sample, addition)`.
    pub fn additions(&self) -> Vec<(u32, bool, EstimateAddition)> {
        let live = self
            .vms
            .iter()
            .filter(|(_, v)| !v.added.is_empty())
            .map(|(&pid, v)| (pid, false, v.added.clone()));
        let gone = self
            .forgotten
            .iter()
            .map(|(&pid, a)| (pid, true, a.clone()));
        let mut out: Vec<_> = live.chain(gone).collect();
        out.sort_by_key(|(pid, exited, _)| (*pid, *exited));
        out
    }

    /// Every budgeted VM's measured hit rate and duty, by pid.
    pub fn states(&self) -> Vec<(u32, DutyCycle)> {
        let mut out: Vec<_> = self
            .vms
            .iter()
            .map(|(&pid, v)| (pid, v.duty.clone()))
            .collect();
        out.sort_by_key(|(pid, _)| *pid);
        out
    }

    /// The share of time VM `pid`'s probes are on now (1 when not budgeted).
    pub fn duty(&self, pid: u32) -> f64 {
        self.vms.get(&pid).map_or(1.0, |v| v.duty.duty())
    }
}

/// What scaling added to a VM's closed windows (the estimate minus what was counted), per
/// count: `serve` adds it to the kernel's cumulative counts, so its counters carry the
/// estimates too (rising at each window's close).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EstimateAddition {
    pub timer: u64,
    pub fd_wakeups: u64,
    pub read: u64,
    pub write: u64,
    /// By (device name, owner): (reads, writes).
    pub devices: BTreeMap<(String, Option<String>), (u64, u64)>,
    /// By callback name.
    pub callbacks: BTreeMap<String, u64>,
}

impl EstimateAddition {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn absorb(&mut self, other: &EstimateAddition) {
        self.timer += other.timer;
        self.fd_wakeups += other.fd_wakeups;
        self.read += other.read;
        self.write += other.write;
        for (k, (r, w)) in &other.devices {
            let e = self.devices.entry(k.clone()).or_default();
            e.0 += r;
            e.1 += w;
        }
        for (k, n) in &other.callbacks {
            *self.callbacks.entry(k.clone()).or_default() += n;
        }
    }
}

/// A fraction as a percentage with two decimals, or two significant digits below 0.1 %.
fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if p >= 0.1 || p <= 0.0 {
        format!("{p:.2}")
    } else {
        let decimals = (1 - p.log10().floor() as i32).max(2) as usize;
        format!("{p:.decimals$}")
    }
}

/// What the budget means here, for the user.
pub fn describe(b: &OverheadBudget) -> String {
    format!(
        "overhead budget {} % of a core per VM; one uprobe hit costs {:.2} µs here (measured; \
         {:.2} in a tight loop, the floor under what each VM's CPU time teaches), so a VM's \
         uprobes are duty-cycled above {:.0} hits/s and its counts marked estimated",
        percent(b.max_fraction),
        b.hit_cost * 1e6,
        b.hit_cost_floor * 1e6,
        b.max_fraction / b.hit_cost
    )
}

/// One VM's duty cycle, for the user: its measured uprobe hits while probed and what they
/// would cost unbudgeted.
pub fn describe_vm(name: &str, d: &DutyCycle, b: &OverheadBudget) -> String {
    let Some(view) = d.view(b) else {
        return format!("{name}: no uprobe rate measured yet");
    };
    format!(
        "{name}: {:.0} uprobe hits/s while probed (counted by its probes), {:.2} µs of its \
         QEMU's CPU per hit ({}), {:.2} % of a core if always probed; probed {:.0} % of the time",
        view.hits_per_second,
        view.hit_cost * 1e6,
        if view.learned {
            "learned from its CPU time"
        } else {
            "the start-up measurement"
        },
        view.full_cost * 100.0,
        view.duty * 100.0
    ) + &format!(
        "; its links ran {:.1} times/s while counting nothing (closing after a pause, \
         attaching at a resume): {:.3} % of a core, out of the budget",
        view.closing_hits_per_second,
        view.closing_cost * 100.0
    )
}

/// Scales a count observed during `on_secs` of a window's `secs` to the whole window.
pub fn scale(count: u64, on_secs: f64, secs: f64) -> u64 {
    if on_secs <= 0.0 || on_secs >= secs {
        return count;
    }
    (count as f64 * secs / on_secs).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::WindowRecord;

    #[test]
    fn small_budgets_keep_two_significant_digits() {
        assert_eq!(percent(0.002), "0.20");
        assert_eq!(percent(0.01), "1.00");
        assert_eq!(percent(0.000_26), "0.026");
        assert_eq!(percent(0.000_012_3), "0.0012");
    }

    const BUDGET: OverheadBudget = OverheadBudget {
        max_fraction: 0.01,
        hit_cost: 1e-6,
        hit_cost_floor: 1e-6,
    };
    /// 0.1 % of a core at 1 µs a hit: a thousand hits a second.
    const TIGHT_BUDGET: OverheadBudget = OverheadBudget {
        max_fraction: 0.001,
        ..BUDGET
    };

    #[test]
    fn a_quiet_vm_is_always_probed() {
        let mut d = DutyCycle::default();
        for _ in 0..10 {
            // 1,000 hits/s × 1 µs = 0.1 % of a core.
            d.measured(&BUDGET, 1000, 1.0);
        }
        assert_eq!((d.duty(), d.block(30)), (1.0, 30));
    }

    #[test]
    fn a_busy_vm_is_probed_a_share_of_each_window() {
        let mut d = DutyCycle::default();
        // 40,000 hits/s × 1 µs = 4 % of a core: a quarter of the time keeps 1 %.
        d.measured(&BUDGET, 40_000, 1.0);
        assert!((d.duty() - 0.25).abs() < 1e-9, "{}", d.duty());
        assert_eq!(d.block(30), 8);
        assert_eq!(d.block(4), 1);
        let cost = d.full_cost(&BUDGET).unwrap() * d.duty();
        assert!(cost <= BUDGET.max_fraction + 1e-12);
    }

    #[test]
    fn what_links_cost_while_counting_nothing_comes_out_of_the_budget() {
        // 40,000 hits/s × 1 µs = 4 % of a core against 1 %: a quarter of the time, until the
        // closing links' runs are known (2,000 a second over a window: 0.2 % of a core);
        // then what is left (0.8 %) is what probing may spend.
        let mut d = DutyCycle::default();
        d.measured(&BUDGET, 40_000, 1.0);
        assert!((d.duty() - 0.25).abs() < 1e-9, "{}", d.duty());
        d.closing_measured(&BUDGET, 20_000, 10.0);
        assert!((d.closing_cost(&BUDGET) - 0.002).abs() < 1e-12);
        assert!((d.duty() - 0.2).abs() < 1e-9, "{}", d.duty());
        let view = d.view(&BUDGET).unwrap();
        assert!((view.closing_cost - 0.002).abs() < 1e-12, "{view:?}");
        assert!(
            describe_vm("vm", &d, &BUDGET).contains(
                "its links ran 2000.0 times/s while counting nothing (closing after a pause, \
                 attaching at a resume): 0.200 % of a core"
            ),
            "{}",
            describe_vm("vm", &d, &BUDGET)
        );
        // Closing links costing the whole budget leave the floor.
        d.closing_measured(&BUDGET, 200_000, 10.0);
        d.closing_measured(&BUDGET, 200_000, 10.0);
        assert_eq!(d.duty(), MIN_DUTY);
    }

    #[test]
    fn closing_hits_are_measured_per_window() {
        // 10-interval windows; 100 closing hits in each of window 0's intervals: its rate
        // is known when window 1 begins.
        let mut b = BudgetedVms::new(BUDGET);
        let u = TIMER_ONLY;
        assert_eq!(b.observe(1, u, 0, None, tick10(0.0)), None);
        for t in 1..=10u32 {
            let hits = Hits {
                live: u64::from(t) * 40_000,
                closing: u64::from(t) * 100,
            };
            if let Some(want) = b.observe(1, u, hits, None, tick10(f64::from(t))) {
                b.applied(1, want, f64::from(t), 0.0);
            }
        }
        let (_, d) = &b.states()[0];
        assert!((d.closing_cost(&BUDGET) - 100.0 * BUDGET.hit_cost).abs() < 1e-12);
    }

    #[test]
    fn the_duty_follows_the_rate_and_has_a_floor() {
        let mut d = DutyCycle::default();
        d.measured(&BUDGET, 10_000_000, 1.0);
        assert_eq!(d.duty(), MIN_DUTY);
        assert_eq!(d.block(10), 1, "at least one interval per window");
        for _ in 0..20 {
            d.measured(&BUDGET, 5_000, 1.0);
        }
        assert_eq!(d.duty(), 1.0);
    }

    /// A window of 10 one-second intervals with a VM at 4 % of a core: probed in one block
    /// of 3 at the window's start (quarter duty, rounded up); the resume takes 0.01 s; the
    /// record is scaled by the time really probed.
    /// A VM whose timer counts come from uprobes, and nothing else.
    const TIMER_ONLY: Uprobed = Uprobed {
        timer: true,
        read_write: false,
        callbacks: false,
    };

    /// The sample at `t` s: 1 s refreshes, 10 s windows.
    fn tick10(t: f64) -> Tick {
        Tick {
            t,
            secs: 1.0,
            window: (t / 10.0).floor() as u64,
            window_intervals: 10,
        }
    }

    #[test]
    fn a_window_is_probed_in_one_block_and_scaled_by_the_time_really_probed() {
        let mut b = BudgetedVms::new(BUDGET);
        let u = TIMER_ONLY;
        let mut hits = 0;
        let mut on = true;
        let mut changes = Vec::new();
        assert_eq!(b.observe(1, u, 0, None, tick10(0.0)), None);
        for t in 1..=20u32 {
            let t = f64::from(t);
            if on {
                hits += 40_000;
            }
            if let Some(want) = b.observe(1, u, hits, None, tick10(t)) {
                changes.push((t, want));
                b.applied(1, want, t, if want { 0.01 } else { 0.0 });
                on = want;
            }
        }
        // Window 0 (first seen at 0): on until the rate is known at 1, then for the rest of
        // its block of 3; window 1: on at 10 for 3 intervals, off at 13.
        assert_eq!(
            changes,
            [(3.0, false), (10.0, true), (13.0, false), (20.0, true)]
        );
        let r = stamped_window_1(&mut b, 120_000);
        // Probed from 10.01 to 13: 2.99 s; 120,000 waits counted → 401,338 in 10 s.
        assert!(r.estimated);
        assert_eq!(r.probed_seconds, Some(2.99));
        assert_eq!(r.timer, Some(401_338));
        // What the estimate added is kept for counters (serve): scaled minus counted.
        let added = |b: &BudgetedVms| b.additions();
        assert_eq!(added(&b).len(), 1);
        let (pid, exited, a) = &added(&b)[0];
        assert_eq!(
            (*pid, *exited, a.timer, a.fd_wakeups),
            (1, false, 281_338, 0)
        );
        // An exited VM's addition is handed out once more, marked, then dropped.
        b.forget(1);
        assert!(added(&b)[0].1);
        assert_eq!(added(&b)[0].2.timer, 281_338);
        b.next_sample(0.0);
        assert!(added(&b).is_empty());
    }

    /// VM 1's record of window 1 (10 s windows) with `timer` waits counted, as its record is
    /// written with `b`'s probed time (and what scaling added given to `b`).
    fn stamped_window_1(b: &mut BudgetedVms, timer: u64) -> WindowRecord {
        use crate::windows::finish::{self, WindowFacts, tests::closed_window};
        let mut closed = closed_window(1, 1, 10.0);
        closed.counts.timer = Some(timer);
        closed.counts.fd_wakeups = Some(0);
        let facts = WindowFacts {
            probed: b.probed(1, closed.from, closed.to),
            ..WindowFacts::default()
        };
        let (r, added) = finish::record(&closed, &facts, &finish::tests::frame(10.0));
        b.absorb(1, &added);
        r
    }

    #[test]
    fn scaling_to_the_whole_window() {
        assert_eq!(scale(250, 2.5, 10.0), 1000);
        assert_eq!(scale(250, 10.0, 10.0), 250);
        assert_eq!(scale(250, 0.0, 10.0), 250);
        assert_eq!(scale(3, 3.0, 10.0), 10);
    }

    #[test]
    fn the_cost_a_vm_really_pays_tightens_its_duty() {
        // The start-up says 1 µs a hit; in QEMU a hit costs 2 µs (its CPU is 1 % of a core
        // higher while probed, at 5,000 hits a second), so the duty halves once a window with
        // probed and unprobed spans has closed.
        let budget = TIGHT_BUDGET;
        let mut b = BudgetedVms::new(budget);
        let u = TIMER_ONLY;
        let (mut hits, mut cpu, mut on) = (0u64, 0.0, true);
        assert_eq!(b.observe(1, u, 0, Some(0.0), tick10(0.0)), None);
        let mut duties = Vec::new();
        for t in 1..=40u32 {
            let t = f64::from(t);
            // The guest's own 5 %, plus the probes' 1 % while they are on.
            cpu += 0.05;
            if on {
                hits += 5_000;
                cpu += 0.01;
            }
            if let Some(want) = b.observe(1, u, hits, Some(cpu), tick10(t)) {
                b.applied(1, want, t, 0.0);
                on = want;
            }
            // Before the first window closes, and at the end.
            if t == 9.0 || t == 40.0 {
                duties.push(b.duty(1));
            }
        }
        // 5,000/s × 1 µs = 0.5 % of a core against 0.1 %: a fifth, from the start-up figure;
        // then the learned 2 µs: a tenth.
        assert!((duties[0] - 0.2).abs() < 1e-9, "{duties:?}");
        assert!((duties[1] - 0.1).abs() < 0.01, "{duties:?}");
        let (_, state) = &b.states()[0];
        let learned = state.hit_cost(&budget);
        assert!((learned - 2e-6).abs() < 0.1e-6, "learned {learned}");
        // What the closing line and `serve` show: the learned cost, not the start-up one.
        let view = state.view(&budget).unwrap();
        assert!(view.learned);
        assert!((view.full_cost - 0.01).abs() < 0.001, "{view:?}");
        let line = describe_vm("noisy", state, &budget);
        assert!(
            line.starts_with("noisy: 5000 uprobe hits/s while probed")
                && line.contains("2.0")
                && line.contains("µs of its QEMU's CPU per hit (learned from its CPU time)")
                && line.contains("probed 10 % of the time"),
            "{line}"
        );
    }

    #[test]
    fn a_learned_cost_goes_below_the_start_up_figure_but_not_the_tight_loops() {
        // Start-up: 0.5 µs in a tight loop, 2 µs after a sleep (a slowed try, say).
        let budget = OverheadBudget::new(
            0.001,
            HitCost {
                tight: 0.5e-6,
                after_sleep: 2e-6,
            },
        );
        assert_eq!(budget.hit_cost, 2e-6);
        let mut d = DutyCycle::default();
        d.measured(&budget, 1000, 1.0);
        assert!(
            (d.duty() - 0.5).abs() < 1e-9,
            "the start-up figure until learned"
        );
        assert!(
            describe_vm("vm", &d, &budget)
                .contains("2.00 µs of its QEMU's CPU per hit (the start-up measurement)")
        );
        // Its CPU time shows 1 µs a hit: 1000 hits/s cost 0.1 % of a core.
        d.calibrated(&budget, 0.021, 0.02);
        assert!((d.hit_cost(&budget) - 1e-6).abs() < 1e-12);
        assert!((d.duty() - 1.0).abs() < 1e-9, "{}", d.duty());
        assert!(d.view(&budget).unwrap().learned);
        // CPU lower while probed (the guest's own load moved): samples of 0 come down to
        // the tight-loop figure, no further.
        for _ in 0..10 {
            d.calibrated(&budget, 0.01, 0.03);
        }
        assert!(d.learned_cost().unwrap() < 0.5e-6);
        assert_eq!(d.hit_cost(&budget), 0.5e-6);
        assert!(
            describe_vm("vm", &d, &budget)
                .contains("0.50 µs of its QEMU's CPU per hit (learned from its CPU time)")
        );
    }

    #[test]
    fn a_window_its_probes_never_saw_has_no_counts_not_zeros() {
        // Paused in window 0; every resume of window 1 failed (an attach refused):
        // its uprobe-served counts are null, not the 0 the probes counted.
        let mut b = BudgetedVms::new(TIGHT_BUDGET);
        let u = TIMER_ONLY;
        let (mut hits, mut on) = (0u64, true);
        b.observe(1, u, 0, None, tick10(0.0));
        for t in 1..=20u32 {
            let t = f64::from(t);
            if on {
                hits += 200_000;
            }
            if let Some(want) = b.observe(1, u, hits, None, tick10(t))
                && !(want && t < 20.0)
            {
                b.applied(1, want, t, 0.0);
                on = want;
            }
        }
        let r = stamped_window_1(&mut b, 0);
        assert_eq!((r.timer, r.fd_wakeups), (None, None));
        assert!(r.estimated);
        assert_eq!(r.probed_seconds, Some(0.0));
        // The counts its probes do not serve stay as counted.
        assert_eq!(r.read, Some(0));
    }

    #[test]
    fn a_failed_resume_moves_the_block_instead_of_losing_it() {
        // A one-interval block whose resume fails at the window's start is
        // probed one interval later, not skipped for the whole window.
        let budget = TIGHT_BUDGET;
        let mut b = BudgetedVms::new(budget);
        let u = TIMER_ONLY;
        let (mut hits, mut on) = (0u64, true);
        b.observe(1, u, 0, None, tick10(0.0));
        let mut changes = Vec::new();
        for t in 1..=12u32 {
            let t = f64::from(t);
            if on {
                hits += 200_000;
            }
            if let Some(want) = b.observe(1, u, hits, None, tick10(t)) {
                changes.push((t, want));
                // The resume at the window's start (10) fails.
                if t != 10.0 {
                    b.applied(1, want, t, 0.0);
                    on = want;
                }
            }
        }
        // 200,000/s × 1 µs = 20 % against 0.1 %: the 5 % floor, one interval of ten.
        assert_eq!(
            changes,
            [(1.0, false), (10.0, true), (11.0, true), (12.0, false)]
        );
    }
}
