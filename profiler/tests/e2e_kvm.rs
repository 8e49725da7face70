//! End-to-end under KVM, where /dev/kvm exists: the symbol-free read/write source from the kvm
//! tracepoints, on Debian's stripped QEMU, with device names from QMP.
//!
//! The guest is a 512-byte boot sector that SeaBIOS runs: it reads the parallel port's data
//! register exactly N times, then writes `D` to the debug console. (A boot sector rather than
//! the Linux test guest because the KVM this machine kind offers, PVM, only runs guests whose
//! kernel supports PVM; SeaBIOS and real-mode code run everywhere.)

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// `mov dx,0x378; mov cx,N; l: in al,dx; loop l; mov dx,0xe9; mov al,'D'; out dx,al; h: hlt;
/// jmp h`, padded to a boot sector.
fn boot_sector(n: u16) -> Vec<u8> {
    let [lo, hi] = n.to_le_bytes();
    let mut code = vec![
        0xBA, 0x78, 0x03, // mov dx, 0x378
        0xB9, lo, hi,   // mov cx, n
        0xEC, // in al, dx
        0xE2, 0xFD, // loop -3
        0xBA, 0xE9, 0x00, // mov dx, 0xe9
        0xB0, b'D', // mov al, 'D'
        0xEE, // out dx, al
        0xF4, // hlt
        0xEB, 0xFD, // jmp -3
    ];
    code.resize(510, 0);
    code.extend([0x55, 0xAA]);
    code
}

/// Sends `cont` on a QMP socket of the test's own (the profiler's QMP client is read-only).
fn qmp_cont(socket: &Path) {
    let deadline = Instant::now() + HANG;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("QMP {}: {e}", socket.display()),
        }
    };
    stream.set_read_timeout(Some(HANG)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    let mut w = stream;
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, r#"{"execute":"cont"}"#] {
        writeln!(w, "{cmd}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(line.contains("\"return\""), "{cmd}: {line}");
                break;
            }
        }
    }
}

#[test]
fn kvm_tracepoints_count_exact_parallel_reads_named_through_qmp() {
    // Only root and the QEMU binary are needed (no guest image); reuse the usual gate.
    if e2e_guest_image("kvm_tracepoints").is_none() {
        return;
    }
    if Prereq::new("kvm_tracepoints").kvm().is_none() {
        return;
    }
    const N: u16 = 30_000;
    let dir = run_dir("kvm");
    let d = dir.path();
    std::fs::write(d.join("boot.img"), boot_sector(N)).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc,accel=kvm",
            "-m",
            "32",
            "-S",
            "-name",
            "guest=e2e-kvm",
        ])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide",
            d.join("boot.img").display()
        ))
        .arg("-debugcon")
        .arg(format!("file:{}", d.join("debugcon").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            d.join("profiler.qmp").display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            d.join("test.qmp").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rec = recording_path(d);
    let mut recorder = profiler()
        .args(["record", "--window", "2", "--vm", "e2e-kvm", "--output"])
        .arg(&rec)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Run the guest once the profiler has found the VM and attached (its first window of the
    // paused VM is written after that); its device names come from QMP in the background
    // meanwhile, and name the counts when their window closes.
    wait_for_record_of(&rec, "e2e-kvm");
    qmp_cont(&d.join("test.qmp"));
    wait_until("the boot sector to finish", HANG, || {
        std::fs::read(d.join("debugcon")).is_ok_and(|b| b.contains(&b'D'))
    });
    // SAFETY: plain signals to our children.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    assert!(recorder.wait().unwrap().success());
    let _ = qemu.kill();
    let _ = qemu.wait();

    let records = load(&rec);
    let windows = of(&records, "e2e-kvm");
    assert!(!windows.is_empty());
    for w in &windows {
        assert_eq!(w.vm.accel, profiler::identity::cmdline::Accel::Kvm, "{w:?}");
        assert_eq!(w.sources.read, "kvm-tracepoints", "{w:?}");
        // Accesses the kernel handled itself are counted apart, never as QEMU reads/writes.
        assert!(w.in_kernel.is_some(), "{w:?}");
    }
    let in_kernel: u64 = windows.iter().filter_map(|w| w.in_kernel).sum();
    eprintln!("in-kernel accesses (PIT, PIC, RTC index, ...): {in_kernel}");
    let parallel: u64 = windows
        .iter()
        .flat_map(|w| &w.devices)
        .filter(|d| d.name == "parallel")
        .map(|d| d.read)
        .sum();
    eprintln!("parallel reads counted from kvm tracepoints: {parallel} of {N}");
    let n = N as u64;
    // SeaBIOS probes the port a few times itself before booting.
    assert!(
        (n..=n + n / 50).contains(&parallel),
        "{parallel} for {n}: {windows:#?}"
    );
}
