//! End-to-end: `profiler list` (which attaches nothing) and `profiler record` (which attaches
//! what the source policy picks) say the same thing about which source serves each count, for
//! each kind of QEMU an operator runs: one built with USDT probes, Debian's stripped one, a
//! stripped one with its debug file, each under TCG, and Debian's stripped one under KVM.
//! Root, real QEMU processes.

mod common;

use std::{ffi::OsStr, path::Path};

use common::*;
use profiler::record::Sources;
use xtask::launch::{DeviceSet, GuestSpec, launch};

/// `profiler list --json`'s sources for VM `name`.
fn listed_sources(name: &str, extra: &[&OsStr]) -> Sources {
    let out = run_ok(profiler().args(["list", "--json"]).args(extra));
    let text = String::from_utf8_lossy(&out.stdout);
    let vm = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("list --json line"))
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed:\n{text}"));
    serde_json::from_value(vm["sources"].clone()).expect("sources object")
}

/// The sources `record` reports for VM `name` in its first window.
fn recorded_sources(name: &str, extra: &[&OsStr], dir: &Path) -> Sources {
    let rec = dir.join(format!("{name}.jsonl"));
    run_ok(
        profiler()
            .args(["record", "--window", "1", "--duration", "2", "--vm", name])
            .args(extra)
            .arg("--output")
            .arg(&rec),
    );
    let records = load(&rec);
    let first = of(&records, name)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no window of {name}"))
        .clone();
    first.sources
}

/// `list` and `record` agree on `name`; returns what they said.
fn agree(name: &str, extra: &[&OsStr], dir: &Path) -> Sources {
    let listed = listed_sources(name, extra);
    let recorded = recorded_sources(name, extra, dir);
    assert_eq!(listed, recorded, "list vs record for {name}");
    // And once more after record has come and gone: list attaches nothing, record detached.
    assert_eq!(listed_sources(name, extra), listed);
    listed
}

#[test]
fn list_and_record_agree_tcg_usdt() {
    let test = "list_and_record_agree_tcg_usdt";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let dir = run_dir("sources-usdt");
    let mut spec = GuestSpec::new("e2e-src-usdt", DeviceSet::Quiet);
    spec.qemu = qemu;
    let guest = launch(&spec, &image, dir.path()).expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let s = agree(&spec.name, &[], dir.path());
    assert_eq!((s.read.as_str(), s.write.as_str()), ("usdt", "usdt"));
    assert_eq!(s.timer_callbacks, "symbols");
}

#[test]
fn list_and_record_agree_tcg_stripped() {
    let test = "list_and_record_agree_tcg_stripped";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let dir = run_dir("sources-stripped");
    let spec = GuestSpec::new("e2e-src-stripped", DeviceSet::Quiet);
    let guest = launch(&spec, &image, dir.path()).expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let s = agree(&spec.name, &[], dir.path());
    assert!(
        s.read
            .starts_with("unavailable: stripped QEMU without USDT probes"),
        "{s:?}"
    );
    assert!(s.timer_callbacks.starts_with("unavailable: "), "{s:?}");
    assert_eq!(
        s.timer, "hrtimer",
        "auto's first choice where the kernel offers it"
    );

    // A kernel that refuses the hrtimer tracepoints (kptr_restrict hides hrtimer_wakeup's
    // address, which their programs need, and so do the libc result probes' hrtimer_start
    // marks): both say the entry and return uprobes, auto's next choice.
    let hidden = KptrRestrict::set("2");
    let s = agree(&spec.name, &[], dir.path());
    assert_eq!(s.timer, "libc-entry-return-uprobes", "{s:?}");
    let out = run_ok(profiler().args(["list", "--json", "--timer-source", "hrtimer"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the kernel does not offer its tracepoints: hrtimer_wakeup has no address"),
        "{text}"
    );
    drop(hidden);
    assert_eq!(listed_sources(&spec.name, &[]).timer, "hrtimer");
}

/// `kernel.kptr_restrict` set for a test, restored when dropped (pass or fail).
struct KptrRestrict(String);

impl KptrRestrict {
    const PATH: &str = "/proc/sys/kernel/kptr_restrict";

    fn set(value: &str) -> Self {
        let before = std::fs::read_to_string(Self::PATH).expect("reading kptr_restrict");
        std::fs::write(Self::PATH, value).expect("setting kptr_restrict");
        Self(before.trim().to_string())
    }
}

impl Drop for KptrRestrict {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[test]
fn list_and_record_agree_tcg_debug_file() {
    let test = "list_and_record_agree_tcg_debug_file";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let dir = run_dir("sources-debug");
    let (stripped, debug_root) = stripped_qemu_with_debug_file(&qemu, dir.path());
    let mut spec = GuestSpec::new("e2e-src-debug", DeviceSet::Quiet);
    spec.qemu = stripped;
    let guest = launch(&spec, &image, dir.path()).expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let extra = ["--debug-dir".as_ref(), debug_root.as_os_str()];
    let s = agree(&spec.name, &extra, dir.path());
    assert_eq!(
        (s.read.as_str(), s.timer_callbacks.as_str()),
        ("symbols", "symbols")
    );
    // Without the debug directory both say the same, too: unavailable.
    let s = agree(&spec.name, &[], dir.path());
    assert!(s.read.starts_with("unavailable: "), "{s:?}");
}

#[test]
fn list_and_record_agree_kvm_stripped() {
    let name = "e2e-src-kvm";
    let Some(_qemu) = kvm_guest_without_qmp(name) else {
        return;
    };
    let dir = run_dir("sources-kvm");
    let s = agree(name, &[], dir.path());
    assert_eq!(
        (s.read.as_str(), s.write.as_str()),
        ("kvm-tracepoints", "kvm-tracepoints")
    );
}
