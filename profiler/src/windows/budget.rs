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
        self.fold_rate(budget, hits, secs, |d| &mut d.closing_rate);
    }

    /// Folds `hits` over `secs` into the smoothed rate `which` picks, and updates the duty.
    fn fold_rate(
        &mut self,
        budget: &OverheadBudget,
        hits: u64,
        secs: f64,
        which: impl FnOnce(&mut Self) -> &mut Option<f64>,
    ) {
        if secs <= 0.0 {
            return;
        }
        let rate = which(self);
        *rate = Some(smoothed(*rate, hits as f64 / secs));
        self.update_duty(budget);
    }

    /// The estimated cost, as a fraction of a core, of probing all the time.
    pub fn full_cost(&self, budget: &OverheadBudget) -> Option<f64> {
        self.rate.map(|r| r * self.hit_cost(budget))
    }

    /// `hits` made over `secs` of probing: updates the rate and the duty.
    pub fn measured(&mut self, budget: &OverheadBudget, hits: u64, secs: f64) {
        self.fold_rate(budget, hits, secs, |d| &mut d.rate);
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
};

/// How long a VM's uprobes were on in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Probed {
    /// All along (or no budget): exact counts.
    #[default]
    Throughout,
    /// For `seconds` of it (0: never); the counts `uprobed` serves are scaled.
    For { seconds: f64, uprobed: Uprobed },
}

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
        // The part of the interval probed with every link in. A block of one interval
        // starts when the resume's links are in, so a whole probed interval never comes
        // then: measuring only those froze the rate at the first window's.
        let probed_secs = vm
            .periods
            .last()
            .filter(|p| vm.on && p.end.is_none())
            .map_or(0.0, |p| t - p.start.max(t - secs));
        if probed_secs >= secs / 2.0 {
            vm.duty
                .measured(&budget, hits.live.saturating_sub(last.live), probed_secs);
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
mod tests;
