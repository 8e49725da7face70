//! End-to-end, guests as operators run them: a real libvirtd (Debian's packages, started here
//! without systemd) runs transient domains; the profiler takes their identity from libvirt
//! (name, uuid, an OpenStack Nova display name), ranks them, names their devices on the USDT
//! QEMU as `<emulator>`, and names the ports of a KVM domain's serial and parallel ports
//! from the well-known table when libvirt holds the monitor. Root.

mod common;

use std::{
    path::Path,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use profiler::record::WindowRecord;

const NOVA_NAME: &str = "web-frontend-01";

/// A domain booting the test guest's kernel under TCG.
struct DomainXml<'a> {
    name: &'a str,
    emulator: &'a str,
    devices: &'a str,
    metadata: &'a str,
    qemu_args: &'a [&'a str],
}

fn kernel_domain(d: &DomainXml<'_>, images: &Path) -> String {
    let args: String = d
        .qemu_args
        .iter()
        .map(|a| format!("<qemu:arg value='{a}'/>"))
        .collect();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n\
         <name>{name}</name>\n<metadata>{metadata}</metadata>\n\
         <memory unit='MiB'>256</memory><vcpu>1</vcpu>\n\
         <os><type arch='x86_64' machine='pc'>hvm</type>\
         <kernel>{img}/vmlinuz</kernel><initrd>{img}/initrd.img</initrd>\
         <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>\n\
         <features><acpi/><apic/></features><on_reboot>destroy</on_reboot>\n\
         <devices><emulator>{emulator}</emulator>{devices}\
         <serial type='file'><source path='{img}/{name}.serial'/><target port='0'/></serial>\
         <video><model type='none'/></video><memballoon model='none'/></devices>\n\
         {qemu}</domain>\n",
        name = d.name,
        metadata = d.metadata,
        img = images.display(),
        emulator = d.emulator,
        devices = d.devices,
        qemu = if args.is_empty() {
            String::new()
        } else {
            format!("<qemu:commandline>{args}</qemu:commandline>")
        },
    )
}

const NOVA_METADATA: &str = "<nova:instance xmlns:nova=\"http://openstack.org/xmlns/libvirt/nova/1.1\">\
    <nova:package version=\"27.1.0\"/><nova:name>web-frontend-01</nova:name>\
    <nova:flavor name=\"m1.small\"><nova:memory>256</nova:memory><nova:vcpus>1</nova:vcpus></nova:flavor>\
    <nova:owner><nova:user uuid=\"0f6a\">alice</nova:user><nova:project uuid=\"8d3c\">shop</nova:project></nova:owner>\
    </nova:instance>";

fn wait_ready(images: &Path, name: &str) {
    let serial = images.join(format!("{name}.serial"));
    let deadline = Instant::now() + BOOT;
    while !std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("PROFILER-GUEST-READY")) {
        assert!(Instant::now() < deadline, "{name} never booted");
        sleep(Duration::from_millis(200));
    }
}

fn listed(name: &str) -> serde_json::Value {
    let out = run_ok(profiler().args(["list", "--json"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed"))
}

fn record(args: &[&str], seconds: u64, dir: &Path, file: &str) -> Vec<WindowRecord> {
    let rec = dir.join(file);
    run_ok(
        profiler()
            .args([
                "record",
                "--window",
                "2",
                "--duration",
                &seconds.to_string(),
            ])
            .args(args)
            .arg("--output")
            .arg(&rec),
    );
    load(&rec)
}

fn timer_rate(windows: &[&WindowRecord]) -> f64 {
    let full: Vec<&&WindowRecord> = windows.iter().filter(|w| !w.partial).collect();
    let events: u64 = full.iter().filter_map(|w| w.timer).sum();
    let secs: f64 = full.iter().map(|w| w.seconds).sum();
    events as f64 / secs.max(1e-9)
}

#[test]
fn libvirt_domains_identity_nova_name_and_ranking() {
    let test = "libvirt_domains";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(_libvirtd) = Libvirtd::start(test) else {
        return;
    };
    let dir = run_dir("libvirt");
    let (images, _, _) = libvirt_images(&image);
    let noisy = LibvirtGuest::create(
        "e2e-lv-noisy",
        &kernel_domain(
            &DomainXml {
                name: "e2e-lv-noisy",
                emulator: "/usr/bin/qemu-system-x86_64",
                devices: "<controller type='usb' model='piix3-uhci'/><input type='tablet' bus='usb'/>\
                          <parallel type='pty'><target port='0'/></parallel>",
                metadata: "",
                qemu_args: &[],
            },
            &images,
        ),
        dir.path(),
    );
    let quiet = LibvirtGuest::create(
        "e2e-lv-quiet",
        &kernel_domain(
            &DomainXml {
                name: "e2e-lv-quiet",
                emulator: "/usr/bin/qemu-system-x86_64",
                devices: "<controller type='usb' model='none'/>",
                metadata: NOVA_METADATA,
                qemu_args: &[],
            },
            &images,
        ),
        dir.path(),
    );
    wait_ready(&images, "e2e-lv-noisy");
    wait_ready(&images, "e2e-lv-quiet");

    // list: libvirt's name and uuid; the Nova instance of the OpenStack-style domain.
    for guest in [&noisy, &quiet] {
        let v = listed(&guest.name);
        assert_eq!(v["uuid"], guest.uuid().as_str(), "{v:#}");
        assert_eq!(v["libvirt"]["name"], guest.name.as_str(), "{v:#}");
        assert_eq!(v["pid"], guest.pid, "{v:#}");
    }
    let v = listed("e2e-lv-quiet");
    assert_eq!(v["libvirt"]["nova"]["name"], NOVA_NAME, "{v:#}");
    assert_eq!(v["libvirt"]["nova"]["project"], "shop", "{v:#}");
    assert_eq!(v["libvirt"]["nova"]["flavor"], "m1.small", "{v:#}");
    let text = String::from_utf8_lossy(&run_ok(profiler().arg("list")).stdout).into_owned();
    assert!(text.contains(&format!("nova name: {NOVA_NAME}")), "{text}");

    // record: the same identity; the UHCI tablet domain ranks above the quiet one.
    let records = record(
        &["--vm", "e2e-lv-noisy", "--vm", "e2e-lv-quiet"],
        10,
        dir.path(),
        "both.jsonl",
    );
    let (n, q) = (of(&records, "e2e-lv-noisy"), of(&records, "e2e-lv-quiet"));
    assert_eq!(n[0].vm.uuid.as_deref(), Some(noisy.uuid().as_str()));
    assert_eq!(
        q[0].vm
            .libvirt
            .as_ref()
            .and_then(|l| l.nova.as_ref()?.name.as_deref()),
        Some(NOVA_NAME)
    );
    let (rn, rq) = (timer_rate(&n), timer_rate(&q));
    eprintln!("timer events/s: noisy {rn:.0}, quiet {rq:.0}");
    assert!(rn > 10.0 * rq, "noisy {rn} vs quiet {rq}");
    // --vm takes the Nova display name too.
    let records = record(&["--vm", NOVA_NAME], 4, dir.path(), "nova.jsonl");
    assert!(!records.is_empty() && records.iter().all(|r| r.vm.name == "e2e-lv-quiet"));

    // top: the same ranking in a real terminal, the Nova name beside the domain's.
    if Prereq::new(test).tool("tmux").is_none() {
        return;
    }
    let session = format!("profiler-e2e-lv-{}", std::process::id());
    let script = format!(
        "{} top --window 2 --vm e2e-lv-noisy --vm e2e-lv-quiet; sleep 30",
        env!("CARGO_BIN_EXE_profiler")
    );
    let tmux = |args: &[&str]| {
        String::from_utf8_lossy(&Command::new("tmux").args(args).output().unwrap().stdout)
            .into_owned()
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "30",
        &script,
    ]);
    let deadline = Instant::now() + HANG;
    let screen = loop {
        sleep(Duration::from_secs(1));
        let screen = tmux(&["capture-pane", "-p", "-t", &session]);
        if screen.contains("window 002") || Instant::now() > deadline {
            break screen;
        }
    };
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    eprintln!("{screen}");
    let row = |needle: &str| {
        screen
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not on screen:\n{screen}"))
    };
    assert!(row("e2e-lv-noisy") < row("e2e-lv-quiet"), "{screen}");
    // The name column may cut the Nova name short; the detail view shows it whole.
    assert!(screen.contains("e2e-lv-quiet (web-f"), "{screen}");
}

#[test]
fn libvirt_domain_on_the_usdt_qemu_names_its_uhci_controller() {
    let test = "libvirt_usdt_emulator";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let Some(_libvirtd) = Libvirtd::start(test) else {
        return;
    };
    let dir = run_dir("libvirt-usdt");
    let (images, _, _) = libvirt_images(&image);
    // Where libvirt's QEMU user can run it (the cache is under root's home).
    let emulator_dir = images.join("usdt");
    std::fs::create_dir_all(&emulator_dir).unwrap();
    let emulator = emulator_dir.join("qemu-system-x86_64");
    std::fs::copy(&qemu, &emulator).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&emulator, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _guest = LibvirtGuest::create(
        "e2e-lv-usdt",
        &kernel_domain(
            &DomainXml {
                name: "e2e-lv-usdt",
                emulator: emulator.to_str().unwrap(),
                devices: "<controller type='usb' model='piix3-uhci'/><input type='tablet' bus='usb'/>",
                metadata: "",
                // A QEMU built from source looks for firmware in its own prefix.
                qemu_args: &["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"],
            },
            &images,
        ),
        dir.path(),
    );
    wait_ready(&images, "e2e-lv-usdt");
    let records = record(&["--vm", "e2e-lv-usdt"], 8, dir.path(), "usdt.jsonl");
    let windows = of(&records, "e2e-lv-usdt");
    assert!(
        windows.iter().all(|w| w.sources.read == "usdt"),
        "{windows:#?}"
    );
    let (reads, _) = device_total(&windows, "uhci");
    assert!(reads > 0, "no uhci reads: {windows:#?}");
    assert!(
        windows
            .iter()
            .flat_map(|w| &w.devices)
            .any(|d| d.name == "uhci" && d.owner.as_deref() == Some("piix3-usb-uhci")),
        "{windows:#?}"
    );
}

#[test]
fn libvirt_kvm_domain_ports_named_from_the_well_known_table() {
    let test = "libvirt_kvm_ports";
    if Prereq::new(test).root().is_none() || Prereq::new(test).kvm_for_the_kvm_group().is_none() {
        return;
    }
    let Some(_libvirtd) = Libvirtd::start(test) else {
        return;
    };
    let dir = run_dir("libvirt-kvm");
    let xml = "<domain type='kvm'><name>e2e-lv-kvm</name><memory unit='MiB'>64</memory>\
               <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
               <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
               <controller type='usb' model='none'/>\
               <serial type='pty'><target port='0'/></serial>\
               <parallel type='pty'><target port='0'/></parallel>\
               <video><model type='none'/></video><memballoon model='none'/></devices></domain>";
    // SeaBIOS probes the serial and parallel ports while it boots: the profiler must be
    // watching before the domain runs, so the domain starts paused and runs once the profiler
    // has written a window of it.
    let boot_recorded = |extra: &[&str], file: &str| -> Vec<String> {
        let rec = dir.path().join(file);
        let mut recorder = KillOnDrop(
            profiler()
                .args(["record", "--window", "2", "--vm", "e2e-lv-kvm", "--output"])
                .arg(&rec)
                .args(extra)
                .spawn()
                .unwrap(),
        );
        let guest = LibvirtGuest::create_paused("e2e-lv-kvm", xml, dir.path());
        wait_for_record_of(&rec, "e2e-lv-kvm");
        guest.resume();
        // SeaBIOS probes COM1 to COM4, then LPT1: once both configured ports are named in a
        // closed window, so is whatever it probed between them.
        let named = |records: &[WindowRecord], prefix: &str| {
            records
                .iter()
                .flat_map(|w| &w.devices)
                .any(|d| d.name.starts_with(prefix))
        };
        let deadline = Instant::now() + HANG;
        loop {
            let records = load_so_far(&rec);
            if named(&records, "serial (serial0, port 0x3f")
                && named(&records, "parallel (parallel0, port 0x37")
            {
                break;
            }
            let names: Vec<&str> = records
                .iter()
                .flat_map(|w| &w.devices)
                .map(|d| d.name.as_str())
                .collect();
            assert!(
                Instant::now() < deadline,
                "SeaBIOS's serial and parallel probes not recorded after {HANG:?}: {names:?}"
            );
            sleep(Duration::from_millis(200));
        }
        // SAFETY: plain signal to our child.
        unsafe { libc::kill(recorder.0.id() as i32, libc::SIGINT) };
        assert!(recorder.0.wait().unwrap().success());
        drop(guest);
        let records = load(&rec);
        let windows = of(&records, "e2e-lv-kvm");
        assert!(!windows.is_empty());
        for w in &windows {
            assert_eq!(w.vm.accel, profiler::identity::cmdline::Accel::Kvm, "{w:?}");
            assert_eq!(w.sources.read, "kvm-tracepoints", "{w:?}");
        }
        windows
            .iter()
            .flat_map(|w| &w.devices)
            .map(|d| d.name.clone())
            .collect()
    };
    let names = boot_recorded(&[], "kvm.jsonl");
    eprintln!("{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("serial (serial0, port 0x3f")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("parallel (parallel0, port 0x37")),
        "{names:?}"
    );
    // COM2 is probed by SeaBIOS but not configured: by address, never called serial.
    assert!(
        !names.iter().any(|n| n.contains("port 0x2f8, well-known")),
        "{names:?}"
    );
}
