//! The fleet view for Prometheus: every VM's cumulative counts as counters, in the
//! node_exporter style: one prefix (`qemu_profiler_`), base units, `_total` counters, an
//! `_info` series carrying identity and sources, and the profiler's own cost.
//!
//! [`FleetState`] is plain data updated once per sample; [`FleetCollector`] encodes it on every
//! scrape with `prometheus-client` (OpenMetrics text, or Prometheus text 0.0.4 for
//! node_exporter's textfile collector and `promtool check metrics`). A count that cannot be
//! observed for a VM (no read/write source, not a KVM guest, no symbols) has no series at all:
//! absent, never 0. No `instance` or `job` label is ever emitted: Prometheus adds those.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    identity::discovery::{VmIdentity, VmKey},
    record::Sources,
    windows::{collector::VmObservation, live::ProfilerCost},
};

/// The prefix of every metric.
pub const PREFIX: &str = "qemu_profiler";

/// One VM's series.
#[derive(Debug, Clone)]
pub struct VmSeries {
    pub observation: VmObservation,
    /// When the VM exited (seconds since the start), if it did; its series stay until the
    /// grace period is over, so its last counts are scraped.
    pub exited_at: Option<f64>,
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct FleetState {
    vms: BTreeMap<VmKey, VmSeries>,
    pub cost: ProfilerCost,
    /// Whether the host-wide sources are attached: (label, available).
    pub sources_up: Vec<(&'static str, bool)>,
    pub window_seconds: f64,
    /// Notes the profiler has said so far.
    pub notes: u64,
    /// Samples taken so far.
    pub samples: u64,
    /// eBPF maps: (name, entries, capacity).
    pub maps: Vec<(&'static str, usize, u32)>,
    /// Updates each eBPF map refused because it was full, since the start.
    pub dropped: Vec<(&'static str, u64)>,
    /// Under `--max-overhead`: what scaling added to each VM's closed windows, added to its
    /// counters so they carry the estimates.
    estimates: BTreeMap<VmKey, crate::windows::budget::EstimateAddition>,
    /// Under `--max-overhead`: each live VM's duty cycle and cost per hit.
    duties: BTreeMap<VmKey, crate::windows::budget::DutyView>,
    ticks_per_second: u64,
}

impl FleetState {
    pub fn new(window_seconds: f64, ticks_per_second: u64) -> Self {
        Self {
            window_seconds,
            ticks_per_second: ticks_per_second.max(1),
            ..Self::default()
        }
    }

    /// Folds one sample in: live VMs' cumulative counts, VMs that exited (final counts), and
    /// drops exited VMs whose grace period (`grace` seconds) is over at `t`.
    pub fn update(
        &mut self,
        t: f64,
        observations: &[VmObservation],
        exits: &[VmObservation],
        grace: f64,
    ) {
        self.samples += 1;
        for (o, exited_at) in observations
            .iter()
            .map(|o| (o, None))
            .chain(exits.iter().map(|o| (o, Some(t))))
        {
            let mut observation = o.clone();
            // Threads are read at window boundaries only: their CPU stays as last read.
            if observation.totals.counts.cpu_roles.is_none() {
                observation.totals.counts.cpu_roles = self
                    .vms
                    .get(&o.key)
                    .and_then(|vm| vm.observation.totals.counts.cpu_roles);
            }
            self.vms.insert(
                o.key,
                VmSeries {
                    observation,
                    exited_at,
                },
            );
        }
        self.vms
            .retain(|_, vm| vm.exited_at.is_none_or(|at| t - at < grace));
        self.estimates.retain(|key, _| self.vms.contains_key(key));
        self.duties.clear();
    }

    /// Under a budget: each live VM's duty view, by pid (after [`Self::update`] of the same
    /// sample).
    pub fn set_duties(&mut self, views: Vec<(u32, crate::windows::budget::DutyView)>) {
        for (pid, view) in views {
            let key = self
                .vms
                .iter()
                .find(|(k, vm)| k.pid == pid && vm.exited_at.is_none())
                .map(|(k, _)| *k);
            if let Some(key) = key {
                self.duties.insert(key, view);
            }
        }
    }

    /// Folds in what the budget's scaling added so far, `(pid, exited at this sample,
    /// addition)` (after [`Self::update`] of the same sample).
    pub fn set_estimates(
        &mut self,
        additions: Vec<(u32, bool, crate::windows::budget::EstimateAddition)>,
    ) {
        for (pid, exited, added) in additions {
            let key = self
                .vms
                .iter()
                .find(|(k, vm)| k.pid == pid && vm.exited_at.is_some() == exited)
                .map(|(k, _)| *k);
            if let Some(key) = key {
                self.estimates.insert(key, added);
            }
        }
    }

    pub fn vms(&self) -> impl Iterator<Item = &VmSeries> {
        self.vms.values()
    }
}

/// The exposition in Prometheus text format 0.0.4 (node_exporter's textfile collector,
/// `promtool check metrics`).
pub fn prometheus_text(state: &Arc<Mutex<FleetState>>) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry(state.clone()))
        .expect("encoding into a String");
    out
}

/// The exposition in OpenMetrics text.
pub fn openmetrics_text(state: &Arc<Mutex<FleetState>>) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry(state.clone()))
        .expect("encoding into a String");
    out
}

/// A registry holding the fleet collector under the metric prefix.
pub fn registry(state: Arc<Mutex<FleetState>>) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(FleetCollector(state)));
    registry
}

/// Encodes the [`FleetState`] on every scrape.
#[derive(Debug)]
pub struct FleetCollector(pub Arc<Mutex<FleetState>>);

/// Short source label: `usdt`, `symbols`, `kvm-tracepoints`, `syscall`, or `unavailable`
/// (the reason is in `profiler list` and the records; it does not belong in a label).
fn short_source(s: &str) -> &str {
    if s.starts_with("unavailable") {
        "unavailable"
    } else {
        s
    }
}

fn available(s: &str) -> bool {
    !s.starts_with("unavailable")
}

/// Labels that identify a VM's series: its name and pid (a restarted VM is a new process,
/// and its counters start again).
fn vm_labels(id: &VmIdentity) -> Vec<(String, String)> {
    vec![
        ("vm".into(), crate::text::clean(&id.name)),
        ("pid".into(), id.pid.to_string()),
    ]
}

fn with(mut labels: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        if !v.is_empty() {
            labels.push((k.to_string(), crate::text::clean(v)));
        }
    }
    labels
}

fn info_labels(id: &VmIdentity, sources: &Sources) -> Vec<(String, String)> {
    let mut labels = vm_labels(id);
    labels = with(
        labels,
        &[
            ("uuid", id.uuid.as_deref().unwrap_or("")),
            ("accel", id.accel.as_str()),
            ("timer_source", short_source(&sources.timer)),
            ("read_source", short_source(&sources.read)),
            ("write_source", short_source(&sources.write)),
            (
                "timer_callbacks_source",
                short_source(&sources.timer_callbacks),
            ),
            ("vcpu_wakeups_source", short_source(&sources.vcpu_wakeups)),
            ("kvm_exits_source", short_source(&sources.kvm_exits)),
        ],
    );
    if let Some(domid) = id.xen_domid {
        labels.push(("xen_domid".into(), domid.to_string()));
    }
    labels
}

/// A counter's value: event counts are integers, seconds are not.
#[derive(Debug, Clone, Copy)]
enum Value {
    Count(u64),
    Seconds(f64),
}

impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Value::Count(n)
    }
}

impl From<f64> for Value {
    fn from(s: f64) -> Self {
        Value::Seconds(s)
    }
}

/// One counter family: name, help, unit, and (labels, value) per series.
struct CounterFamily {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    series: Vec<(Vec<(String, String)>, Value)>,
}

impl CounterFamily {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            unit: None,
            series: Vec::new(),
        }
    }
    fn seconds(mut self) -> Self {
        self.unit = Some(Unit::Seconds);
        self
    }
    fn push(&mut self, labels: Vec<(String, String)>, value: impl Into<Value>) {
        self.series.push((labels, value.into()));
    }
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            self.name,
            self.help,
            self.unit.as_ref(),
            MetricType::Counter,
        )?;
        for (labels, value) in &self.series {
            let family = metric.encode_family(labels)?;
            match *value {
                Value::Count(n) => ConstCounter::new(n).encode(family)?,
                Value::Seconds(s) => ConstCounter::new(s).encode(family)?,
            }
        }
        Ok(())
    }
}

/// The per-VM counter families, `(name, help)`, in the order they are exposed.
const VM_COUNTERS: [(&str, &str); 13] = [
    (
        "timer_events",
        "Wakeups of the VM's QEMU event loop by an expired deadline (a wait syscall returned \
         0 after a finite timeout).",
    ),
    (
        "fd_wakeups",
        "Wakeups of the VM's QEMU event loop by a ready file descriptor.",
    ),
    (
        "reads",
        "Guest reads of emulated devices that QEMU's device model handled.",
    ),
    (
        "writes",
        "Guest writes to emulated devices that QEMU's device model handled.",
    ),
    (
        "device_reads",
        "Guest reads QEMU handled, by device (QEMU's region name, or a port/page).",
    ),
    (
        "device_writes",
        "Guest writes QEMU handled, by device (QEMU's region name, or a port/page).",
    ),
    (
        "in_kernel_accesses",
        "KVM guests: device accesses the kernel handled without waking QEMU.",
    ),
    (
        "timer_callback_runs",
        "Runs of a QEMU timer callback (needs QEMU's symbols).",
    ),
    (
        "device_model_cpu",
        "User + system CPU time of the VM's QEMU process.",
    ),
    (
        "vcpu_wakeups",
        "KVM guests: times a vCPU thread was woken after sleeping in a guest halt (the \
         guest's own timer, an interrupt): host wakeups QEMU's event loop never sees.",
    ),
    (
        "vcpu_halt_polls",
        "KVM guests: guest halts that ended while KVM still polled, before the vCPU thread \
         slept.",
    ),
    (
        "kvm_exits",
        "KVM guests, where the kernel fires kvm:kvm_exit (VMX, SVM): VM exits by reason, \
         named as the kernel's table names them (reasons it does not name: other).",
    ),
    (
        "thread_cpu",
        "CPU time of the VM's threads by role, read at window boundaries: vcpu (vCPU threads, \
         their guest time included), vcpu_guest (that guest time), device_model (main loop \
         and iothreads), kernel_workers (kernel threads working for this VM alone, \
         kvm-pit/PID outside its process included).",
    ),
];

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A poisoned lock still holds the last complete update.
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let tps = state.ticks_per_second as f64;

        // Identity.
        if state.vms.values().next().is_some() {
            let mut info = encoder.encode_descriptor(
                "vm",
                "A QEMU process the profiler watches: identity, accelerator and the source of \
                 each count.",
                None,
                MetricType::Info,
            )?;
            for vm in state.vms() {
                let o = &vm.observation;
                info.encode_info(&info_labels(&o.identity, &o.sources))?;
            }
        }

        let [
            mut timer,
            mut fd,
            mut reads,
            mut writes,
            mut device_reads,
            mut device_writes,
            mut in_kernel,
            mut callbacks,
            mut cpu,
            mut vcpu_wakeups,
            mut halt_polls,
            mut exits,
            mut thread_cpu,
        ] = VM_COUNTERS.map(|(name, help)| CounterFamily::new(name, help));
        cpu = cpu.seconds();
        thread_cpu = thread_cpu.seconds();
        let none = crate::windows::budget::EstimateAddition::default();
        for vm in state.vms() {
            let o = &vm.observation;
            let labels = vm_labels(&o.identity);
            let c = &o.totals.counts;
            // Counted, plus what the budget's estimates added to closed windows.
            let add = state.estimates.get(&o.key).unwrap_or(&none);
            if let Some(n) = c.timer {
                timer.push(labels.clone(), n + add.timer);
            }
            if let Some(n) = c.fd_wakeups {
                fd.push(labels.clone(), n + add.fd_wakeups);
            }
            if available(&o.sources.read)
                && let (Some(r), Some(w)) = (c.read, c.write)
            {
                reads.push(labels.clone(), r + add.read);
                writes.push(labels.clone(), w + add.write);
                for (key, (r, w)) in &o.totals.devices {
                    let owner = key.owner.as_deref().unwrap_or("");
                    let l = with(
                        labels.clone(),
                        &[("device", &key.name), ("device_type", owner)],
                    );
                    let (ar, aw) = add
                        .devices
                        .get(&(key.name.clone(), key.owner.clone()))
                        .copied()
                        .unwrap_or_default();
                    device_reads.push(l.clone(), *r + ar);
                    device_writes.push(l, *w + aw);
                }
            }
            if let Some(n) = c.in_kernel {
                in_kernel.push(labels.clone(), n);
            }
            if available(&o.sources.timer_callbacks) {
                for (name, n) in &o.totals.callbacks {
                    let a = add.callbacks.get(name).copied().unwrap_or(0);
                    callbacks.push(with(labels.clone(), &[("callback", name)]), *n + a);
                }
            }
            if let Some(n) = c.vcpu_wakeups {
                vcpu_wakeups.push(labels.clone(), n);
            }
            if let Some(n) = c.vcpu_halt_polls {
                halt_polls.push(labels.clone(), n);
            }
            let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
            for (reason, n) in &o.totals.exits {
                // Names outside the kernel's table (`vmx:0x..`) would make the label unbounded.
                let reason = if reason.contains(':') {
                    "other"
                } else {
                    reason
                };
                *by_reason.entry(reason).or_default() += n;
            }
            for (reason, n) in by_reason {
                exits.push(with(labels.clone(), &[("reason", reason)]), n);
            }
            if let Some(r) = c.cpu_roles {
                for (role, ticks) in [
                    ("vcpu", r.vcpu),
                    ("vcpu_guest", r.vcpu_guest),
                    ("device_model", r.device_model),
                    ("kernel_workers", r.workers_in_process + r.workers_outside),
                ] {
                    thread_cpu.push(with(labels.clone(), &[("role", role)]), ticks as f64 / tps);
                }
            }
            if let Some(ticks) = c.cpu_ticks {
                cpu.push(labels, ticks as f64 / tps);
            }
        }
        // Under a budget: what it knows of each VM.
        for (name, help, unit, value) in [
            (
                "budget_probed_ratio",
                "Under --max-overhead: the share of time the VM's uprobes are attached (1: \
                 always; its counts are scaled and marked estimated when below).",
                None,
                (|v: &crate::windows::budget::DutyView| v.duty)
                    as fn(&crate::windows::budget::DutyView) -> f64,
            ),
            (
                "budget_hit_cost",
                "Under --max-overhead: CPU time of the VM's QEMU per uprobe hit, learned from \
                 its CPU time with the probes on and off (the start-up measurement until then; \
                 never below the start-up's tight-loop figure).",
                Some(Unit::Seconds),
                |v| v.hit_cost,
            ),
            (
                "budget_unbudgeted_cost_ratio",
                "Under --max-overhead: the share of a core the VM's uprobes would cost it if \
                 always attached (hits per second while probed times the cost per hit).",
                None,
                |v| v.full_cost,
            ),
            (
                "budget_closing_cost_ratio",
                "Under --max-overhead: the share of a core the VM's uprobe links cost while \
                 they counted nothing (closing after a pause, attaching at a resume); it comes \
                 out of the budget before any probing.",
                None,
                |v| v.closing_cost,
            ),
        ] {
            if state.duties.is_empty() {
                break;
            }
            let mut m = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for (key, view) in &state.duties {
                if let Some(vm) = state.vms.get(key) {
                    let labels = vm_labels(&vm.observation.identity);
                    ConstGauge::new(value(view)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        for family in [
            &timer,
            &fd,
            &reads,
            &writes,
            &device_reads,
            &device_writes,
            &in_kernel,
            &callbacks,
            &cpu,
            &vcpu_wakeups,
            &halt_polls,
            &exits,
            &thread_cpu,
        ] {
            family.encode(&mut encoder)?;
        }

        // The profiler itself.
        let gauge = |encoder: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     series: &[(Vec<(String, String)>, i64)]|
         -> Result<(), std::fmt::Error> {
            if series.is_empty() {
                return Ok(());
            }
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, v) in series {
                ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
            }
            Ok(())
        };
        let mut by_source: BTreeMap<&str, u64> = BTreeMap::new();
        for vm in state.vms().filter(|v| v.exited_at.is_none()) {
            *by_source
                .entry(short_source(&vm.observation.sources.read))
                .or_default() += 1;
        }
        let vms: Vec<(Vec<(String, String)>, i64)> = by_source
            .into_iter()
            .map(|(s, n)| (vec![("read_source".to_string(), s.to_string())], n as i64))
            .collect();
        gauge(
            &mut encoder,
            "vms",
            "QEMU processes watched now, by the source of their read/write counts.",
            &vms,
        )?;
        let up: Vec<(Vec<(String, String)>, i64)> = state
            .sources_up
            .iter()
            .map(|(s, ok)| (vec![("source".to_string(), s.to_string())], i64::from(*ok)))
            .collect();
        let entries: Vec<(Vec<(String, String)>, i64)> = state
            .maps
            .iter()
            .map(|(m, n, _)| (vec![("map".to_string(), m.to_string())], *n as i64))
            .collect();
        gauge(
            &mut encoder,
            "bpf_map_entries",
            "Entries in each of the profiler's eBPF maps now.",
            &entries,
        )?;
        let capacity: Vec<(Vec<(String, String)>, i64)> = state
            .maps
            .iter()
            .map(|(m, _, max)| (vec![("map".to_string(), m.to_string())], i64::from(*max)))
            .collect();
        gauge(
            &mut encoder,
            "bpf_map_capacity",
            "Entries each of the profiler's eBPF maps can hold.",
            &capacity,
        )?;
        gauge(
            &mut encoder,
            "source_up",
            "Whether a host-wide probe source is attached (1) or unavailable (0).",
            &up,
        )?;
        {
            let mut m = encoder.encode_descriptor(
                "window_length_seconds",
                "Length of the profiler's windows (records, textfile updates).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(state.window_seconds).encode(m.encode_family(&Vec::<(
                String,
                String,
            )>::new(
            ))?)?;
        }
        let mut own = [
            CounterFamily::new(
                "bpf_program_runs",
                "Runs of the profiler's eBPF programs (kernel BPF statistics, sampled one \
                 refresh in 10 and scaled).",
            ),
            CounterFamily::new(
                "bpf_program_run",
                "Time spent in the profiler's eBPF programs (kernel BPF statistics, sampled one \
                 refresh in 10 and scaled; 0 when the kernel keeps none).",
            )
            .seconds(),
            CounterFamily::new(
                "collector_cpu",
                "User + system CPU time of the profiler process.",
            )
            .seconds(),
            CounterFamily::new(
                "samples",
                "Samples that read every VM (one per window boundary, start or exit).",
            ),
            CounterFamily::new(
                "bpf_map_dropped_updates",
                "Updates an eBPF map refused because it was full: events or names lost, so \
                 counts are low by up to this many.",
            ),
            CounterFamily::new(
                "bpf_program_skipped_runs",
                "Probe runs the kernel skipped because another BPF program or BPF map operation \
                 held the CPU (a recursion miss): events of any process, counts may be low by up \
                 to this many.",
            ),
            CounterFamily::new(
                "notes",
                "Diagnostics the profiler has logged (sources not used, names not available, \
                 output failing).",
            ),
        ];
        own[0].push(Vec::new(), state.cost.bpf_run_count);
        own[1].push(Vec::new(), state.cost.bpf_run_time_ns as f64 / 1e9);
        own[2].push(Vec::new(), state.cost.collector_cpu_seconds);
        own[3].push(Vec::new(), state.samples);
        for (map, n) in &state.dropped {
            if *map == crate::probes::NESTED_RUNS {
                own[5].push(Vec::new(), *n);
            } else {
                own[4].push(vec![("map".to_string(), map.to_string())], *n);
            }
        }
        own[6].push(Vec::new(), state.notes);
        for family in &own {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
