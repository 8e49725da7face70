//! End-to-end under KVM: what a guest does on its own, which never reaches QEMU. The guests
//! are boot sectors SeaBIOS runs on Debian's stripped QEMU (no symbols, no monitor): one sets
//! the PIT to 1,000 Hz and halts between its interrupts, one to 100 Hz, one halts with every
//! interrupt masked; and SeaBIOS idling with nothing to boot. The PIT's rate is the reference:
//! a vCPU halted between its interrupts is woken exactly that often.

mod common;

use std::{path::Path, process::Stdio};

use common::*;
use profiler::record::WindowRecord;
use xtask::{
    boot_sector::{BootSector, BootSectorGuest},
    launch::RunningGuest,
};

/// Root, /dev/kvm and Debian's QEMU, or `None` after saying which is missing.
fn kvm_host(test: &str) -> Option<()> {
    let p = Prereq::new(test);
    p.root()?;
    p.kvm()?;
    p.system_qemu()
}

fn start(spec: &BootSectorGuest, dir: &Path) -> RunningGuest {
    let guest = spec.launch(dir).expect("QEMU starts");
    guest
        .wait_for_line(&spec.ready_line(), BOOT)
        .expect("the guest runs");
    guest
}

/// Whether this host's KVM is PVM, which does not fire `kvm:kvm_exit`.
fn pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").is_dir()
}

fn full<'a>(records: &'a [WindowRecord], name: &str) -> Vec<&'a WindowRecord> {
    of(records, name)
        .into_iter()
        .filter(|w| !w.partial)
        .collect()
}

/// Each full window: the guest's own ticks at `hz` (its BIOS's timer handler makes one `out`
/// to the PIC per tick, handled in the kernel: `in_kernel`), and a vCPU wakeup per tick. A
/// tick wakes the vCPU only if it was halted when the tick came: with every host CPU busy (as
/// measured in that window) the vCPU thread waits for a CPU, and takes some ticks without
/// halting in between, and the in-kernel PIT's thread waits too, delivering the ticks late
/// (caught up later). There the ticks are held to the rate's order (not SeaBIOS's 18.2 Hz nor
/// another guest's rate) and the wakeups to at most the ticks.
fn assert_rate(windows: &[&WindowRecord], hz: f64) {
    assert!(!windows.is_empty());
    for w in windows {
        let n = w
            .vcpu_wakeups
            .unwrap_or_else(|| panic!("not counted: {w:?}"));
        let rate = n as f64 / w.seconds;
        let ticks = w
            .in_kernel
            .unwrap_or_else(|| panic!("no in-kernel accesses: {w:?}")) as f64
            / w.seconds;
        let host = w.host.as_ref().unwrap_or_else(|| panic!("no host: {w:?}"));
        let idle_cpus = f64::from(host.cpus) - host.busy_cpu_seconds / w.seconds;
        eprintln!(
            "{} window {}: {rate:.1} vCPU wakeups/s, {ticks:.1} ticks/s, {idle_cpus:.2} host \
             CPUs idle",
            w.vm.name, w.window
        );
        assert!(rate <= ticks * 1.03, "more wakeups than ticks: {w:?}");
        if idle_cpus >= 0.5 {
            assert!(
                (ticks - hz).abs() <= hz * 0.03,
                "{ticks} ticks/s for a {hz} Hz PIT: {w:?}"
            );
            assert!(
                (rate - hz).abs() <= hz * 0.03,
                "{rate}/s for a {hz} Hz PIT with {idle_cpus:.2} CPUs idle: {w:?}"
            );
        } else {
            eprintln!(
                "  the host had no CPU idle: ticks held to the rate's order, wakeups to them"
            );
            assert!(
                ticks > hz * 0.5 && ticks < hz * 1.5,
                "{ticks} ticks/s for a {hz} Hz PIT: {w:?}"
            );
        }
    }
}

#[test]
fn vcpu_wakeups_are_the_guest_s_own_timer_and_its_cpu_goes_to_its_vcpu() {
    if kvm_host("kvm_guest_wakeups").is_none() {
        return;
    }
    let dir = run_dir("kvm-guest");
    let d = dir.path();
    let pit1000 = BootSectorGuest::new("e2e-pit1000", BootSector::Pit { hz: 1000 });
    // Threads unnamed (no debug-threads): the vCPU is told by what it does.
    let pit100 = BootSectorGuest {
        thread_names: false,
        ..BootSectorGuest::new("e2e-pit100", BootSector::Pit { hz: 100 })
    };
    let halt = BootSectorGuest::new("e2e-halt", BootSector::Halt);
    let bios = BootSectorGuest::seabios("e2e-seabios");
    let _guests: Vec<RunningGuest> = [&pit1000, &pit100, &halt, &bios]
        .into_iter()
        .map(|g| start(g, d))
        .collect();
    let rec = recording_path(d);
    let mut cmd = profiler();
    cmd.args(["record", "--window", "10", "--duration", "40", "--output"])
        .arg(&rec);
    for g in ["e2e-pit1000", "e2e-pit100", "e2e-halt", "e2e-seabios"] {
        cmd.args(["--vm", g]);
    }
    run_ok(cmd.stderr(Stdio::inherit()));
    let records = load(&rec);

    assert_rate(&full(&records, "e2e-pit1000"), 1000.0);
    assert_rate(&full(&records, "e2e-pit100"), 100.0);
    for w in full(&records, "e2e-halt") {
        assert_eq!(w.vcpu_wakeups, Some(0), "nothing armed: {w:?}");
    }
    for w in full(&records, "e2e-seabios") {
        let rate = w.vcpu_wakeups.unwrap() as f64 / w.seconds;
        assert!(rate < 50.0, "SeaBIOS idles at its 18.2 Hz tick: {w:?}");
    }
    for w in &records {
        assert_eq!(w.sources.vcpu_wakeups, "kvm-tracepoints", "{w:?}");
        // None of it reaches QEMU's event loop.
        assert_eq!(w.timer, Some(0), "{w:?}");
        if pvm() {
            assert!(
                w.sources.kvm_exits.starts_with("unavailable: ")
                    && w.sources.kvm_exits.contains("PVM"),
                "{w:?}"
            );
            assert!(w.kvm_exits.is_empty(), "{w:?}");
        }
    }
    // Where the CPU went: nearly all of the 1 kHz guest's into its vCPU thread (named by
    // QEMU), and the 100 Hz guest's vCPU found by what it does; the in-kernel PIT's kernel
    // thread works for the 1 kHz guest beside its process.
    for (name, threads_named) in [("e2e-pit1000", true), ("e2e-pit100", false)] {
        for w in full(&records, name) {
            let split = w.cpu_by_role.unwrap_or_else(|| panic!("no split: {w:?}"));
            let cpu = w.cpu_seconds.unwrap();
            eprintln!("{name} window {}: CPU {cpu} s, {split:?}", w.window);
            assert_eq!(split.vcpu_threads, 1, "named {threads_named}: {w:?}");
            if name == "e2e-pit1000" {
                assert!(split.vcpu >= 0.9 * cpu, "{w:?}");
                assert!(split.kernel_workers > 0.0, "{w:?}");
            }
        }
    }
    if !pvm() {
        // VMX/SVM: every wakeup follows an exit for the halt.
        for w in full(&records, "e2e-pit1000") {
            let halts: u64 = w
                .kvm_exits
                .iter()
                .filter(|e| e.reason.eq_ignore_ascii_case("hlt"))
                .map(|e| e.count)
                .sum();
            assert!(halts >= w.vcpu_wakeups.unwrap(), "{w:?}");
        }
    }

    // `check` holds a guest to a host-wakeup rate and names where they come from.
    let check = |vm: &str| {
        profiler()
            .args(["check", "--vm", vm, "--window", "5", "--windows", "2"])
            .args(["--max-wakeup-rate", "100"])
            .output()
            .unwrap()
    };
    let noisy = check("e2e-pit1000");
    let text = String::from_utf8_lossy(&noisy.stdout);
    eprintln!("{text}");
    assert_eq!(noisy.status.code(), Some(1), "{text}");
    assert!(text.contains("wakeups") && text.contains("NOISY"), "{text}");
    assert!(text.contains("vCPU wakeups from guest halts"), "{text}");
    let quiet = check("e2e-seabios");
    let text = String::from_utf8_lossy(&quiet.stdout);
    assert_eq!(quiet.status.code(), Some(0), "{text}");
}

/// Under TCG the guest's timers are QEMU timers, already counted: no vCPU wakeups, and the
/// record says why.
#[test]
fn a_tcg_guest_s_record_says_why_it_has_no_vcpu_wakeups() {
    let p = Prereq::new("tcg_guest_no_vcpu_wakeups");
    if p.root().is_none() || p.system_qemu().is_none() {
        return;
    }
    let dir = run_dir("tcg-guest");
    let spec = BootSectorGuest {
        accel: "tcg".into(),
        ..BootSectorGuest::new("e2e-tcg-pit", BootSector::Pit { hz: 100 })
    };
    let _guest = start(&spec, dir.path());
    let rec = recording_path(dir.path());
    run_ok(
        profiler()
            .args([
                "record",
                "--window",
                "3",
                "--duration",
                "7",
                "--vm",
                "e2e-tcg-pit",
            ])
            .arg("--output")
            .arg(&rec),
    );
    let records = load(&rec);
    assert!(!records.is_empty());
    for w in &records {
        assert_eq!(w.vcpu_wakeups, None, "{w:?}");
        let why = &w.sources.vcpu_wakeups;
        assert!(
            why.starts_with("unavailable: ") && why.contains("TCG"),
            "{why}"
        );
        // Its 100 Hz PIT is a QEMU timer here, and counted as one.
        assert!(w.timer.is_some_and(|n| n > 0), "{w:?}");
    }
    let line = std::fs::read_to_string(&rec).unwrap();
    assert!(line.contains("\"vcpu_wakeups\":null"), "{line}");
}
