//! Live snapshots for tests, with numbers like the ones measured on this project's test host
//! (DESIGN.md): a guest with USB emulation wakes QEMU ~1,933 times a second, the same guest
//! without it ~8.9 times.

use crate::{
    identity::{
        cmdline::Accel,
        discovery::{VmIdentity, VmKey},
    },
    record::{DeviceCount, PartialReason, Sources, TimerCallbackCount, VmRef, WindowRecord},
    windows::{
        collector::Counts,
        live::{LiveSnapshot, LiveVm, ProfilerCost},
    },
};

pub const WINDOW_SECS: f64 = 30.0;
/// 17.3 s into window 012.
pub const T: f64 = 377.3;

const USDT: &str = "usdt memory_region_ops";
const SYSCALL: &str = "syscall tracepoints";
const STRIPPED: &str = "unavailable: stripped QEMU without USDT probes or symbols";

fn start(window: u64, offset: f64) -> String {
    let secs = window as f64 * WINDOW_SECS + offset;
    let whole = secs.floor() as u64;
    let millis = ((secs - whole as f64) * 1000.0).round() as u64;
    format!(
        "2026-11-22T00:{:02}:{:02}.{millis:03}Z",
        whole / 60,
        whole % 60
    )
}

/// Deterministic jitter in -spread..=spread.
fn jitter(window: u64, salt: u64, spread: u64) -> i64 {
    let h = window
        .wrapping_mul(2_654_435_761)
        .wrapping_add(salt.wrapping_mul(40_503))
        % (2 * spread + 1);
    h as i64 - spread as i64
}

fn around(base: u64, window: u64, salt: u64, spread: u64) -> u64 {
    (base as i64 + jitter(window, salt, spread)).max(0) as u64
}

fn identity(name: &str, pid: u32, uuid: Option<&str>, accel: Accel) -> VmIdentity {
    VmIdentity {
        name: name.into(),
        pid,
        uuid: uuid.map(Into::into),
        xen_domid: None,
        accel,
        devices: Vec::new(),
        libvirt: None,
        guest_memory_bytes: None,
    }
}

fn sources(timer: &str, rw: &str) -> Sources {
    Sources {
        timer: timer.into(),
        read: rw.into(),
        write: rw.into(),
        // The USDT fixtures stand for unstripped builds, which also name timer callbacks.
        timer_callbacks: if rw.starts_with("unavailable") {
            "unavailable: needs QEMU's symbols: /usr/bin/qemu-system-x86_64 is stripped; \
             install its debug symbols"
                .into()
        } else {
            "symbols".into()
        },
        ..Default::default()
    }
}

fn vm_ref(id: &VmIdentity) -> VmRef {
    VmRef {
        name: id.name.clone(),
        pid: id.pid,
        uuid: id.uuid.clone(),
        accel: id.accel,
        xen_domid: id.xen_domid,
        cmdline_devices: Vec::new(),
        libvirt: None,
        started: None,
        guest_memory_bytes: None,
    }
}

fn device(name: &str, read: u64, write: u64) -> DeviceCount {
    DeviceCount {
        name: name.into(),
        owner: None,
        read,
        write,
    }
}

fn callback(name: &str, count: u64) -> TimerCallbackCount {
    TimerCallbackCount {
        callback: name.into(),
        count,
    }
}

/// A full window `w` with counts from `f`.
fn record(id: &VmIdentity, src: &Sources, w: u64, f: impl Fn(&mut WindowRecord)) -> WindowRecord {
    let mut r = crate::record::tests::window(&id.name, id.pid, w, WINDOW_SECS);
    r.start = start(w, 0.0);
    r.vm = vm_ref(id);
    (r.timer, r.fd_wakeups) = (None, None);
    r.sources = src.clone();
    f(&mut r);
    r
}

fn live(
    id: VmIdentity,
    start_ticks: u64,
    devices: &[&str],
    src: Sources,
    history: Vec<WindowRecord>,
) -> LiveVm {
    LiveVm {
        key: VmKey {
            pid: id.pid,
            start_ticks,
        },
        identity: id.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        sources: src.into(),
        running: Counts::default(),
        running_elapsed: T - 12.0 * WINDOW_SECS,
        running_cpu_seconds: None,
        history: history.into(),
        exited: false,
    }
}

/// A guest with default devices and a USB tablet: UHCI polls 1,000 times a second.
pub fn noisy() -> LiveVm {
    let id = identity(
        "noisy-usb",
        4242,
        Some("5f1c2a9e-7b3d-4c11-9a0e-2d4f6b8c1e37"),
        Accel::Tcg,
    );
    let src = sources(SYSCALL, USDT);
    let history = (0..12)
        .map(|w| {
            record(&id, &src, w, |r| {
                r.timer = Some(around(57_990, w, 1, 450));
                r.fd_wakeups = Some(around(1_850, w, 2, 40));
                r.read = Some(around(918, w, 3, 25));
                r.write = Some(around(1_416, w, 4, 30));
                r.cpu_seconds = Some(1.62 + jitter(w, 5, 4) as f64 / 100.0);
                r.cpu_by_role = Some(crate::record::CpuByRole {
                    vcpu: 1.19,
                    vcpu_guest: 0.0,
                    device_model: 0.36,
                    other: r.cpu_seconds.unwrap() - 1.55,
                    kernel_workers: 0.0,
                    vcpu_threads: 1,
                });
                r.devices = vec![
                    device("uhci", around(738, w, 6, 20), 0),
                    device("apic-msi", 0, around(1_416, w, 4, 30)),
                    device("hpet", 180, 0),
                ];
                r.timers = vec![
                    callback("uhci_frame_timer", 29_250),
                    callback("gui_update", 900),
                    callback("hpet_timer", 240),
                ];
            })
        })
        .collect();
    let mut vm = live(
        id,
        88_120,
        &[
            "usb-tablet",
            "piix3-usb-uhci",
            "isa-serial",
            "isa-parallel",
            "VGA",
            "ide-cd",
        ],
        src,
        history,
    );
    set_running(&mut vm, [33_460, 1_069, 531, 818], 94);
    vm
}

/// A TCG guest's running window so far: timer, fd, read and write events, and its CPU time
/// in ticks (100 a second).
fn set_running(vm: &mut LiveVm, [timer, fd, read, write]: [u64; 4], cpu_ticks: u64) {
    vm.running = Counts {
        timer: Some(timer),
        fd_wakeups: Some(fd),
        read: Some(read),
        write: Some(write),
        cpu_ticks: Some(cpu_ticks),
        ..Counts::default()
    };
    vm.running_cpu_seconds = Some(cpu_ticks as f64 / 100.0);
}

/// The same guest with `-parallel none -vga none` and no USB: 8.9 wakeups a second.
pub fn quiet() -> LiveVm {
    let id = identity("quiet", 4310, None, Accel::Tcg);
    let src = sources(SYSCALL, USDT);
    let history = (0..12)
        .map(|w| {
            record(&id, &src, w, |r| {
                r.timer = Some(around(267, w, 11, 3));
                r.fd_wakeups = Some(around(18, w, 12, 2));
                r.read = Some(12);
                r.write = Some(9);
                r.cpu_seconds = Some(0.05);
                r.devices = vec![device("hpet", 12, 0), device("apic-msi", 0, 9)];
                r.timers = vec![
                    callback("hpet_timer", 180),
                    callback("rtc_update_timer", 30),
                ];
            })
        })
        .collect();
    let mut vm = live(id, 88_310, &["isa-serial"], src, history);
    set_running(&mut vm, [154, 10, 7, 5], 3);
    vm
}

/// A distribution QEMU without USDT probes or symbols: reads and writes cannot be counted.
pub fn legacy() -> LiveVm {
    let id = identity(
        "legacy-ubuntu",
        5120,
        Some("0e8f4c6a-1d2b-4e3f-8a9b-7c6d5e4f3a21"),
        Accel::Kvm,
    );
    let src = Sources {
        vcpu_wakeups: "kvm-tracepoints".into(),
        kvm_exits: "kvm-tracepoints".into(),
        ..sources(SYSCALL, STRIPPED)
    };
    let history = (0..12)
        .map(|w| {
            record(&id, &src, w, |r| {
                r.timer = Some(around(4_500, w, 21, 60));
                r.fd_wakeups = Some(around(1_200, w, 22, 30));
                r.cpu_seconds = Some(0.45);
                // A Linux guest's 250 Hz tick, halting between ticks.
                r.vcpu_wakeups = Some(around(7_420, w, 23, 40));
                r.vcpu_halt_polls = Some(around(310, w, 24, 15));
                r.in_kernel = Some(around(15_100, w, 25, 90));
                r.cpu_by_role = Some(crate::record::CpuByRole {
                    vcpu: 0.38,
                    vcpu_guest: 0.11,
                    device_model: 0.05,
                    other: 0.02,
                    kernel_workers: 0.03,
                    vcpu_threads: 2,
                });
                r.kvm_exits = [
                    ("HLT", 7_730),
                    ("EXTERNAL_INTERRUPT", 4_210),
                    ("MSR_WRITE", 3_980),
                    ("EPT_MISCONFIG", 640),
                ]
                .map(|(reason, count)| crate::record::ExitCount {
                    reason: reason.into(),
                    count,
                })
                .to_vec();
            })
        })
        .collect();
    let mut vm = live(
        id,
        90_002,
        &["virtio-net-pci", "virtio-blk-pci", "usb-tablet"],
        src,
        history,
    );
    vm.running = Counts {
        timer: Some(2_595),
        fd_wakeups: Some(690),
        read: None,
        write: None,
        cpu_ticks: Some(26),
        in_kernel: Some(8_640),
        vcpu_wakeups: Some(4_270),
        vcpu_halt_polls: Some(180),
        ..Counts::default()
    };
    vm.running_cpu_seconds = Some(0.26);
    vm
}

/// Booted 4.2 s ago: no closed window yet.
pub fn fresh() -> LiveVm {
    let id = identity("fresh-boot", 6001, None, Accel::Tcg);
    let src = sources(SYSCALL, USDT);
    let mut vm = live(id, 124_530, &["isa-serial", "e1000"], src, Vec::new());
    set_running(&mut vm, [1_290, 42, 2_950, 1_880], 20);
    vm.running_elapsed = 4.2;
    vm
}

/// A Xen guest that exited 20 s into window 010.
pub fn exited() -> LiveVm {
    let mut id = identity("batch-07", 4777, None, Accel::Xen);
    id.xen_domid = Some(7);
    let src = sources(SYSCALL, "usdt handle_ioreq");
    let mut history: Vec<WindowRecord> = (0..11)
        .map(|w| {
            record(&id, &src, w, |r| {
                r.timer = Some(around(60, w, 31, 5));
                r.fd_wakeups = Some(around(300, w, 32, 10));
                r.read = Some(45);
                r.write = Some(around(90, w, 33, 4));
                r.cpu_seconds = Some(0.03);
                r.devices = vec![device("xen-platform", 45, 90)];
            })
        })
        .collect();
    let last = history.last_mut().expect("11 windows");
    last.seconds = 20.0;
    last.partial = true;
    last.partial_reason = Some(PartialReason::VmExited);
    last.timer = Some(40);
    last.read = Some(30);
    last.write = Some(60);
    last.devices = vec![device("xen-platform", 30, 60)];
    let mut vm = live(id, 87_700, &[], src, history);
    vm.running_elapsed = 0.0;
    vm.exited = true;
    vm
}

pub fn cost() -> ProfilerCost {
    ProfilerCost {
        bpf_run_count: 2_345_678,
        bpf_run_time_ns: 199_382_630,
        collector_cpu_seconds: 1.24,
    }
}

/// Five VMs, 17.3 s into window 012.
pub fn snapshot() -> LiveSnapshot {
    LiveSnapshot {
        t: T,
        window: 12,
        window_secs: WINDOW_SECS,
        vms: vec![quiet(), noisy(), exited(), legacy(), fresh()],
        cost: cost(),
        live_sources: vec![SYSCALL.into(), USDT.into()],
        notes: Vec::new(),
    }
}

/// Windows recorded on this project's test host (`profiler record --window 10`, KVM/PVM,
/// Debian's QEMU 7.2): a boot sector that sets the PIT to 1,000 Hz and halts, one at 100 Hz,
/// and SeaBIOS waiting with no boot device (`-nic none`). As `top` holds them after the third
/// window closed.
pub fn recorded_kvm() -> LiveSnapshot {
    let text = include_str!("../../tests/fixtures/records/kvm-pit-and-seabios.jsonl");
    let (records, _) = crate::record::read_records(text.as_bytes()).expect("fixture reads");
    let mut vms: Vec<LiveVm> = Vec::new();
    for r in records {
        match vms.iter_mut().find(|v| v.identity.name == r.vm.name) {
            Some(vm) => vm.history.push(r),
            None => {
                let mut id = identity(&r.vm.name, r.vm.pid, None, r.vm.accel);
                id.devices = r.vm.cmdline_devices.clone();
                let mut vm = live(id, 1, &[], r.sources.clone(), vec![r]);
                vm.running_elapsed = 0.0;
                vms.push(vm);
            }
        }
    }
    LiveSnapshot {
        t: 30.0,
        window: 3,
        window_secs: 10.0,
        vms,
        cost: cost(),
        live_sources: vec!["hrtimer".into(), "kvm-tracepoints".into()],
        notes: Vec::new(),
    }
}

/// One VM whose command line tries to clear the screen, retitle the terminal, and more.
pub fn hostile() -> LiveSnapshot {
    let mut vm = noisy();
    std::sync::Arc::make_mut(&mut vm.identity).name = "\x1b[2J\x1b]0;pwned\x07".into();
    std::sync::Arc::make_mut(&mut vm.identity).uuid = Some("\x1b[31mred\u{202E}txt.exe".into());
    vm.devices = vec!["usb-\x1b[5mblink".into(), "\u{9B}6n".into()];
    let history: Vec<WindowRecord> = vm
        .history
        .iter()
        .map(|r| {
            let mut r = (**r).clone();
            r.vm.name = vm.identity.name.clone();
            r.devices[0].name = "\x1b]8;;http://x\x07uhci".into();
            r.timers[0].callback = "uhci\x1b[1Aframe".into();
            r
        })
        .collect();
    vm.history = history.into();
    LiveSnapshot {
        vms: vec![vm, quiet()],
        live_sources: vec!["syscall\x1b[0m tracepoints".into()],
        ..snapshot()
    }
}

/// The VM of `snapshot` with this name.
pub fn vm<'a>(snapshot: &'a LiveSnapshot, name: &str) -> &'a LiveVm {
    snapshot
        .vms
        .iter()
        .find(|v| v.identity.name == name)
        .unwrap_or_else(|| panic!("no VM {name} in fixture"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_numbers_are_realistic() {
        let s = snapshot();
        let noisy = vm(&s, "noisy-usb").history.last().unwrap();
        let per_s = noisy.timer.unwrap() as f64 / noisy.seconds;
        assert!((1_900.0..1_970.0).contains(&per_s), "{per_s}");
        let quiet = vm(&s, "quiet").history.last().unwrap();
        let per_s = quiet.timer.unwrap() as f64 / quiet.seconds;
        assert!((8.5..9.5).contains(&per_s), "{per_s}");
        assert_eq!(start(1, 0.0), "2026-11-22T00:00:30.000Z");
    }
}
