//! `profiler check`'s verdict: per VM and requested device class, quiet, noisy (with the
//! evidence and the remedy) or cannot tell (no source sees that class on that VM). Pure: it
//! works on window records, live or from a file.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::identity::devices::DeviceClass;
use crate::text::clean;
use crate::{analysis::report::group_by_vm, record::WindowRecord};

/// What `check` was asked.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub classes: Vec<&'static DeviceClass>,
    /// Windows starting less than this many seconds after a VM's first window are skipped
    /// (boot-time noise, a just-attached probe).
    pub settle: f64,
    /// Also call a VM noisy when its timer events exceed this rate (per second).
    pub max_timer_rate: Option<f64>,
    /// Also call a VM noisy when the host wakeups it causes (QEMU's timer and fd wakeups, its
    /// vCPUs woken from guest halts) exceed this rate (per second).
    pub max_wakeup_rate: Option<f64>,
}

/// A verdict on one class of one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Quiet {
        /// Set when only part of the class could be seen (e.g. USB through its frame timers
        /// only, without a read/write source).
        #[serde(skip_serializing_if = "Option::is_none")]
        partly: Option<String>,
    },
    Noisy {
        evidence: Vec<Evidence>,
    },
    CannotTell {
        why: String,
    },
}

/// One device or callback that made a class noisy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    /// `uhci (piix3-usb-uhci)`, `timer callback uhci_frame_timer`, `timer events`.
    pub what: String,
    pub events: u64,
    /// Events per second over the windows checked.
    pub per_second: f64,
    /// The windows it happened in.
    pub windows: Vec<u64>,
}

/// The verdict on one class, with whether the command line creates such a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassVerdict {
    pub class: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The command-line device that creates it (`usb-tablet`, `default:parallel`); `None`
    /// when none does; absent when the recording does not say.
    pub configured: Option<String>,
    #[serde(skip)]
    pub configured_known: bool,
    /// What to change, for a noisy class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<RemedyOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemedyOut {
    pub qemu: String,
    pub libvirt: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub measured: String,
}

/// All verdicts on one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmVerdict {
    pub name: String,
    pub pid: u32,
    pub uuid: Option<String>,
    pub accel: String,
    /// The windows checked, and the seconds they cover.
    pub windows: Vec<u64>,
    pub seconds: f64,
    pub read_source: String,
    pub callbacks_source: String,
    pub classes: Vec<ClassVerdict>,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    pub vms: Vec<VmVerdict>,
    /// 0 every requested class quiet on every VM; 1 something noisy; 2 cannot tell, or no VM.
    pub exit_code: u8,
}

fn unavailable_reason(source: &str) -> Option<&str> {
    source
        .strip_prefix("unavailable: ")
        .or_else(|| source.starts_with("unavailable").then_some("unavailable"))
}

/// The events of `class` in one window: (what, events) for each device and callback.
fn events_in(class: &DeviceClass, w: &WindowRecord) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for d in &w.devices {
        if class.has_device(&d.name, d.owner.as_deref()) && d.read + d.write > 0 {
            out.push((
                format!("{} ({} reads, {} writes)", d.label(), d.read, d.write),
                d.read + d.write,
            ));
        }
    }
    for t in &w.timers {
        if class.has_callback(&t.callback) && t.count > 0 {
            out.push((format!("timer callback {}", t.callback), t.count));
        }
    }
    out
}

/// Judges every VM in `records`.
pub fn check(records: &[WindowRecord], req: &CheckRequest) -> CheckReport {
    let mut vms = Vec::new();
    for vm in group_by_vm(records) {
        let windows = vm.after_settle(req.settle);
        let seconds: f64 = windows.iter().map(|w| w.seconds).sum();
        let last = vm.windows.last().expect("a group has a window");
        let read_source = last.sources.read.clone();
        let callbacks_source = last.sources.timer_callbacks.clone();
        let devices_known = !last.vm.cmdline_devices.is_empty();
        let mut classes = Vec::new();
        for class in &req.classes {
            let configured = class.configured_by(&last.vm.cmdline_devices);
            let verdict = judge(class, &windows, seconds, &read_source, &callbacks_source);
            let remedy = matches!(verdict, Verdict::Noisy { .. }).then(|| RemedyOut {
                qemu: class.remedy.qemu.into(),
                libvirt: class.remedy.libvirt.into(),
                measured: class.remedy.measured.into(),
            });
            classes.push(ClassVerdict {
                class: class.id.into(),
                verdict,
                configured,
                configured_known: devices_known,
                remedy,
            });
        }
        if let Some(max) = req.max_timer_rate {
            classes.push(judge_rate(&windows, seconds, max, &TIMER_RATE));
        }
        if let Some(max) = req.max_wakeup_rate {
            classes.push(judge_rate(&windows, seconds, max, &WAKEUP_RATE));
        }
        vms.push(VmVerdict {
            name: vm.name.to_string(),
            pid: vm.pid,
            uuid: vm.uuid.map(String::from),
            accel: vm.accel.to_string(),
            windows: windows.iter().map(|w| w.window).collect(),
            seconds,
            read_source,
            callbacks_source,
            classes,
        });
    }
    let verdicts = || vms.iter().flat_map(|v| &v.classes).map(|c| &c.verdict);
    let exit_code = if verdicts().any(|v| matches!(v, Verdict::Noisy { .. })) {
        1
    } else if vms.is_empty() || verdicts().any(|v| matches!(v, Verdict::CannotTell { .. })) {
        2
    } else {
        0
    };
    CheckReport { vms, exit_code }
}

fn judge(
    class: &DeviceClass,
    windows: &[&WindowRecord],
    seconds: f64,
    read_source: &str,
    callbacks_source: &str,
) -> Verdict {
    if windows.is_empty() {
        return Verdict::CannotTell {
            why: "no window after the settle time".into(),
        };
    }
    let by_regions =
        !class.regions.is_empty() || !class.ports.is_empty() || !class.owners.is_empty();
    let by_callbacks = !class.callbacks.is_empty();
    let regions_seen = unavailable_reason(read_source).is_none();
    let callbacks_seen = unavailable_reason(callbacks_source).is_none();
    if !(by_regions && regions_seen || by_callbacks && callbacks_seen) {
        let why = match (by_regions, unavailable_reason(read_source)) {
            (true, Some(why)) => format!("no read/write source sees its registers: {why}"),
            _ => format!(
                "no source sees its timer callbacks: {}",
                unavailable_reason(callbacks_source).unwrap_or("unavailable")
            ),
        };
        return Verdict::CannotTell { why };
    }
    let mut found: BTreeMap<String, (u64, Vec<u64>)> = BTreeMap::new();
    for w in windows {
        for (what, n) in events_in(class, w) {
            // Per-window labels carry that window's counts; key the evidence by the device or
            // callback alone.
            let key = what.split(" (").next().unwrap_or(&what).to_string();
            let e = found.entry(key).or_default();
            e.0 += n;
            if e.1.last() != Some(&w.window) {
                e.1.push(w.window);
            }
        }
    }
    if found.is_empty() {
        let partly = match (by_regions && regions_seen, by_callbacks && callbacks_seen) {
            (true, false) if by_callbacks => {
                Some("seen through its registers only (no timer callbacks)".to_string())
            }
            (false, true) if by_regions => {
                Some("seen through its timer callbacks only (no read/write source)".to_string())
            }
            _ => None,
        };
        return Verdict::Quiet { partly };
    }
    let mut evidence: Vec<Evidence> = found
        .into_iter()
        .map(|(what, (events, windows))| Evidence {
            what,
            events,
            per_second: if seconds > 0.0 {
                events as f64 / seconds
            } else {
                0.0
            },
            windows,
        })
        .collect();
    evidence.sort_by(|a, b| b.events.cmp(&a.events).then(a.what.cmp(&b.what)));
    Verdict::Noisy { evidence }
}

/// One count of a window record, named as evidence calls it.
type RatePart = (&'static str, fn(&WindowRecord) -> Option<u64>);

/// A rate `check` can hold a VM to: the class its verdict is reported under, and the counts
/// that add up to it, each with what its evidence is called.
struct RateLimit {
    class: &'static str,
    /// What is counted, for a verdict that cannot tell.
    counted: &'static str,
    parts: &'static [RatePart],
}

const TIMER_RATE: RateLimit = RateLimit {
    class: "timers",
    counted: "timer events",
    parts: &[("timer events", |w| w.timer)],
};

/// The host wakeups a VM causes: every one is a context switch and the end of a CPU's idle
/// state. Under KVM most of an idle guest's are its own (its tick wakes its halted vCPU);
/// under TCG the guest's timers are QEMU timers, counted in `timer`.
const WAKEUP_RATE: RateLimit = RateLimit {
    class: "wakeups",
    counted: "host wakeups (QEMU timer, fd and vCPU wakeups)",
    parts: &[
        ("vCPU wakeups from guest halts", |w| w.vcpu_wakeups),
        ("QEMU timer wakeups", |w| w.timer),
        ("QEMU fd wakeups", |w| w.fd_wakeups),
    ],
};

/// Holds `windows` to `max` per second of `limit`'s counts summed: noisy with each part's
/// share as evidence (largest first) when the sum is above it over the windows checked.
fn judge_rate(
    windows: &[&WindowRecord],
    seconds: f64,
    max: f64,
    limit: &RateLimit,
) -> ClassVerdict {
    let of_window = |w: &WindowRecord| -> Option<u64> {
        limit
            .parts
            .iter()
            .filter_map(|(_, count)| count(w))
            .reduce(|a, b| a + b)
    };
    let total: Option<u64> = windows.iter().map(|w| of_window(w)).sum();
    let verdict = match total {
        _ if windows.is_empty() || seconds <= 0.0 => Verdict::CannotTell {
            why: "no window after the settle time".into(),
        },
        None => Verdict::CannotTell {
            why: format!("{} were not counted", limit.counted),
        },
        Some(n) if n as f64 / seconds > max => {
            let over: Vec<u64> = windows
                .iter()
                .filter(|w| of_window(w).is_some_and(|n| n as f64 / w.seconds > max))
                .map(|w| w.window)
                .collect();
            let mut evidence: Vec<Evidence> = limit
                .parts
                .iter()
                .filter_map(|(what, count)| {
                    let events: u64 = windows.iter().filter_map(|w| count(w)).sum();
                    (events > 0).then(|| Evidence {
                        what: format!("{what} ({} more than {max}/s)", limit.class),
                        events,
                        per_second: events as f64 / seconds,
                        windows: over.clone(),
                    })
                })
                .collect();
            evidence.sort_by_key(|e| std::cmp::Reverse(e.events));
            Verdict::Noisy { evidence }
        }
        Some(_) => Verdict::Quiet { partly: None },
    };
    ClassVerdict {
        class: limit.class.into(),
        verdict,
        configured: None,
        configured_known: false,
        remedy: None,
    }
}

/// The report for people: one block per VM, one line per class, the evidence and the fix
/// under each noisy class, the verdict last.
pub fn render_text(report: &CheckReport) -> String {
    use std::fmt::Write as _;

    use crate::analysis::report::thousands;
    let mut out = String::new();
    if report.vms.is_empty() {
        out.push_str("no VM to check\n");
    }
    for vm in &report.vms {
        let _ = writeln!(
            out,
            "VM {} (pid {}, {}{}): {} window(s), {:.0} s, read/write: {}, timer callbacks: {}",
            clean(&vm.name),
            vm.pid,
            vm.accel,
            vm.uuid
                .as_deref()
                .map(|u| format!(", {}", clean(u)))
                .unwrap_or_default(),
            vm.windows.len(),
            vm.seconds,
            clean(short(&vm.read_source)),
            clean(short(&vm.callbacks_source)),
        );
        for c in &vm.classes {
            let configured = match (&c.configured, c.configured_known) {
                (Some(d), _) => format!("configured: {}", clean(d)),
                (None, true) => "not configured".to_string(),
                (None, false) => String::new(),
            };
            let (word, detail) = match &c.verdict {
                Verdict::Quiet { partly: None } => ("quiet", None),
                Verdict::Quiet { partly: Some(p) } => ("quiet", Some(p.clone())),
                Verdict::Noisy { .. } => ("NOISY", None),
                Verdict::CannotTell { why } => ("cannot tell", Some(clean(why))),
            };
            let _ = writeln!(out, "  {:<9} {word:<11} {configured}", c.class);
            if let Some(detail) = detail {
                let _ = writeln!(out, "            {detail}");
            }
            if let Verdict::Noisy { evidence } = &c.verdict {
                for e in evidence {
                    let _ = writeln!(
                        out,
                        "            {}: {} events ({:.1}/s) in window(s) {}",
                        clean(&e.what),
                        thousands(Some(e.events)),
                        e.per_second,
                        windows_list(&e.windows)
                    );
                }
            }
            if let Some(r) = &c.remedy {
                let _ = writeln!(out, "            fix (QEMU):    {}", r.qemu);
                let _ = writeln!(out, "            fix (libvirt): {}", r.libvirt);
                if !r.measured.is_empty() {
                    let _ = writeln!(out, "            measured:      {}", r.measured);
                }
            }
        }
    }
    let verdict = match report.exit_code {
        0 => "every requested class is quiet",
        1 => "something is noisy",
        _ => "cannot tell (a class could not be seen, or no VM matched)",
    };
    let _ = writeln!(out, "verdict: {verdict} (exit {})", report.exit_code);
    out
}

/// `unavailable: <long reason>` → `unavailable`; sources as they are otherwise.
fn short(source: &str) -> &str {
    if source.starts_with("unavailable") {
        "unavailable"
    } else {
        source
    }
}

/// `[1, 2, 3, 7]` → `001-003, 007`.
pub fn windows_list(windows: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < windows.len() {
        let start = windows[i];
        let mut end = start;
        while i + 1 < windows.len() && windows[i + 1] == end + 1 {
            i += 1;
            end = windows[i];
        }
        parts.push(if start == end {
            format!("{start:03}")
        } else {
            format!("{start:03}-{end:03}")
        });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::devices::class,
        record::{DeviceCount, TimerCallbackCount},
    };

    fn window(name: &str, n: u64, read: &str, callbacks: &str) -> WindowRecord {
        let mut r = crate::record::tests::window(name, 42, n, 10.0);
        r.vm.cmdline_devices = vec!["usb".into(), "usb-tablet".into(), "default:parallel".into()];
        r.timer = Some(19_330);
        (r.read, r.write) = (Some(0), Some(0));
        r.cpu_seconds = Some(0.5);
        r.sources.read = read.into();
        r.sources.write = read.into();
        r.sources.timer_callbacks = callbacks.into();
        r
    }

    fn req(classes: &[&str]) -> CheckRequest {
        CheckRequest {
            classes: classes.iter().map(|c| class(c).unwrap()).collect(),
            settle: 10.0,
            max_timer_rate: None,
            max_wakeup_rate: None,
        }
    }

    #[test]
    fn a_polling_usb_controller_is_noisy_with_its_callback_and_device() {
        let mut records: Vec<WindowRecord> = (0..4)
            .map(|n| window("noisy", n, "usdt", "symbols"))
            .collect();
        for w in &mut records {
            w.timers = vec![TimerCallbackCount {
                callback: "uhci_frame_timer".into(),
                count: 9_750,
            }];
            w.devices = vec![DeviceCount {
                name: "uhci".into(),
                owner: Some("piix3-usb-uhci".into()),
                read: 246,
                write: 0,
            }];
        }
        let report = check(&records, &req(&["usb", "parallel"]));
        assert_eq!(report.exit_code, 1);
        let vm = &report.vms[0];
        // Window 0 (the settle time) is not counted.
        assert_eq!(vm.windows, [1, 2, 3]);
        let usb = &vm.classes[0];
        assert_eq!(usb.configured.as_deref(), Some("usb"));
        let Verdict::Noisy { evidence } = &usb.verdict else {
            panic!("{usb:?}")
        };
        assert_eq!(evidence[0].what, "timer callback uhci_frame_timer");
        assert_eq!(evidence[0].events, 3 * 9_750);
        assert!((evidence[0].per_second - 975.0).abs() < 1e-9);
        assert_eq!(evidence[0].windows, [1, 2, 3]);
        assert_eq!(evidence[1].what, "uhci");
        assert!(
            usb.remedy
                .as_ref()
                .unwrap()
                .libvirt
                .contains("model='none'")
        );
        // The parallel port is there (by default) and quiet.
        let parallel = &vm.classes[1];
        assert_eq!(parallel.verdict, Verdict::Quiet { partly: None });
        assert_eq!(parallel.configured.as_deref(), Some("default:parallel"));
        assert!(parallel.remedy.is_none());
    }

    #[test]
    fn a_quiet_guest_passes() {
        let records: Vec<WindowRecord> = (0..3)
            .map(|n| window("quiet", n, "usdt", "symbols"))
            .collect();
        let report = check(&records, &req(&["usb", "parallel", "serial"]));
        assert_eq!(report.exit_code, 0, "{report:#?}");
    }

    #[test]
    fn what_cannot_be_seen_is_never_quiet() {
        let stripped = "unavailable: stripped QEMU without USDT probes: no debug file found";
        let records: Vec<WindowRecord> = (0..3)
            .map(|n| window("stripped", n, stripped, "unavailable: stripped QEMU"))
            .collect();
        let report = check(&records, &req(&["usb", "parallel"]));
        assert_eq!(report.exit_code, 2);
        for c in &report.vms[0].classes {
            let Verdict::CannotTell { why } = &c.verdict else {
                panic!("{c:?}")
            };
            crate::testing::assert_contains(why, "stripped QEMU");
        }
        // USB through its frame timer only: quiet, but says so.
        let records: Vec<WindowRecord> = (0..3)
            .map(|n| window("symbols-only", n, stripped, "symbols"))
            .collect();
        let report = check(&records, &req(&["usb"]));
        assert_eq!(report.exit_code, 0);
        assert!(matches!(
            &report.vms[0].classes[0].verdict,
            Verdict::Quiet { partly: Some(p) } if p.contains("timer callbacks only")
        ));
        // No VM at all.
        assert_eq!(check(&[], &req(&["usb"])).exit_code, 2);
    }

    #[test]
    fn the_timer_rate_limit() {
        let records: Vec<WindowRecord> = (0..3)
            .map(|n| window("busy", n, "usdt", "symbols"))
            .collect();
        let mut r = req(&[]);
        r.max_timer_rate = Some(100.0);
        let report = check(&records, &r);
        assert_eq!(report.exit_code, 1);
        let Verdict::Noisy { evidence } = &report.vms[0].classes[0].verdict else {
            panic!()
        };
        assert!((evidence[0].per_second - 1933.0).abs() < 1e-9);
        r.max_timer_rate = Some(5000.0);
        assert_eq!(check(&records, &r).exit_code, 0);
    }

    /// A KVM guest whose own 1 kHz timer wakes its halted vCPU: noisy by its wakeups, the
    /// evidence naming the vCPU wakeups first; a TCG guest's wakeups are its QEMU's.
    #[test]
    fn the_wakeup_rate_limit_names_the_vcpu_wakeups() {
        let kvm: Vec<WindowRecord> = (0..3)
            .map(|n| {
                let mut w = window("pit", n, "kvm-tracepoints", "unavailable: stripped");
                w.vm.accel = crate::identity::cmdline::Accel::Kvm;
                (w.timer, w.fd_wakeups, w.vcpu_wakeups) = (Some(0), Some(20), Some(9_900));
                w
            })
            .collect();
        let mut r = req(&[]);
        r.max_wakeup_rate = Some(100.0);
        let report = check(&kvm, &r);
        assert_eq!(report.exit_code, 1);
        let c = &report.vms[0].classes[0];
        assert_eq!(c.class, "wakeups");
        let Verdict::Noisy { evidence } = &c.verdict else {
            panic!("{c:?}")
        };
        assert!(evidence[0].what.starts_with("vCPU wakeups"), "{evidence:?}");
        assert!((evidence[0].per_second - 990.0).abs() < 1e-9);
        assert_eq!(evidence[0].windows, [1, 2]);
        let text = render_text(&report);
        assert!(
            text.contains(
                "vCPU wakeups from guest halts (wakeups more than 100/s): 19,800 events (990.0/s)"
            ),
            "{text}"
        );
        // A quiet guest passes; one whose wakeups nothing counted cannot be told.
        let quiet: Vec<WindowRecord> = kvm
            .iter()
            .cloned()
            .map(|mut w| {
                w.vcpu_wakeups = Some(182);
                w
            })
            .collect();
        assert_eq!(check(&quiet, &r).exit_code, 0);
        let blind: Vec<WindowRecord> = kvm
            .iter()
            .cloned()
            .map(|mut w| {
                (w.timer, w.fd_wakeups, w.vcpu_wakeups) = (None, None, None);
                w
            })
            .collect();
        assert_eq!(check(&blind, &r).exit_code, 2);
        // TCG: no vCPU wakeups, the QEMU's own count.
        let tcg: Vec<WindowRecord> = (0..3)
            .map(|n| window("tcg", n, "usdt", "symbols"))
            .collect();
        let Verdict::Noisy { evidence } = &check(&tcg, &r).vms[0].classes[0].verdict else {
            panic!()
        };
        assert_eq!(evidence.len(), 1);
        assert!(evidence[0].what.starts_with("QEMU timer wakeups"));
    }

    #[test]
    fn json_shape() {
        let records: Vec<WindowRecord> = (0..2)
            .map(|n| window("quiet", n, "usdt", "symbols"))
            .collect();
        let v = serde_json::to_value(check(&records, &req(&["usb"]))).unwrap();
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["vms"][0]["classes"][0]["class"], "usb");
        assert_eq!(v["vms"][0]["classes"][0]["verdict"], "quiet");
        assert_eq!(v["vms"][0]["classes"][0]["configured"], "usb");
    }

    #[test]
    fn text_names_the_device_the_windows_and_the_fix() {
        let mut records: Vec<WindowRecord> = (0..4)
            .map(|n| window("noisy", n, "usdt", "symbols"))
            .collect();
        for w in records.iter_mut().skip(2) {
            w.timers = vec![TimerCallbackCount {
                callback: "uhci_frame_timer".into(),
                count: 9_750,
            }];
        }
        let text = render_text(&check(&records, &req(&["usb", "parallel"])));
        assert!(
            text.contains("usb       NOISY       configured: usb"),
            "{text}"
        );
        assert!(
            text.contains(
                "timer callback uhci_frame_timer: 19,500 events (650.0/s) in window(s) 002-003"
            ),
            "{text}"
        );
        assert!(
            text.contains("fix (libvirt): <controller type='usb' model='none'/>"),
            "{text}"
        );
        assert!(
            text.contains("parallel  quiet       configured: default:parallel"),
            "{text}"
        );
        assert!(
            text.ends_with("verdict: something is noisy (exit 1)\n"),
            "{text}"
        );
        assert_eq!(windows_list(&[1, 2, 3, 7, 9, 10]), "001-003, 007, 009-010");
    }
}
