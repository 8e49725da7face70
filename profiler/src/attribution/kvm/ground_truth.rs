//! Root + KVM: the KVM counters against ground truth, on a real guest (SeaBIOS, no disk)
//! under this machine's KVM: the debugcon bytes QEMU wrote, QEMU's own dispatch trace, and
//! the same run's kvm events recorded by tracefs and replayed through the programs' code.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use aya::Ebpf;
use profiler_common::kvm::{
    self as k, KVM_FAST_MMIO, KVM_MMIO_READ_IN_KERNEL, KVM_MMIO_WRITE_IN_KERNEL,
    KVM_PIO_READ_IN_KERNEL, KVM_PIO_WRITE_IN_KERNEL, KvmEvent, MMIO_WRITE, replay::replay_threads,
};

use super::{KvmCounts, kvm_counts};
use crate::probes::sources::kvm::{PROGRAMS, attach, outstanding_counts};

/// A tracefs instance (own ring buffer, so nothing else's tracing is disturbed) with the
/// four kvm events enabled in `fields` format; disabled and removed on drop.
struct TraceInstance(std::path::PathBuf);

impl TraceInstance {
    fn new(tracefs: &Path, name: &str) -> Self {
        let dir = tracefs.join("instances").join(name);
        std::fs::create_dir(&dir).expect("creating a tracefs instance");
        let instance = Self(dir);
        let write = |rel: &str, value: &str| {
            std::fs::write(instance.0.join(rel), value)
                .unwrap_or_else(|e| panic!("writing {value} to {rel}: {e}"));
        };
        write("options/fields", "1");
        write("options/record-tgid", "1");
        write("trace_clock", "global");
        write("buffer_size_kb", "16384");
        for event in PROGRAMS {
            write(&format!("events/kvm/{event}/enable"), "1");
        }
        instance
    }
    fn stop(&self) {
        for event in PROGRAMS {
            let _ = std::fs::write(self.0.join(format!("events/kvm/{event}/enable")), "0");
        }
    }
    fn overruns(&self) -> u64 {
        let mut total = 0;
        for cpu in std::fs::read_dir(self.0.join("per_cpu")).unwrap().flatten() {
            let stats = std::fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
            for line in stats.lines() {
                if let Some(n) = line.strip_prefix("overrun:") {
                    total += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        total
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One line of the instance's `trace` with `fields` and `record-tgid` on, e.g.
/// ` qemu-system-x86-27851   (  27849) [000] .....  2364.33: kvm_pio: rw=0x1 (1) port=...`.
fn parse_trace_line(line: &str) -> Option<(u32, u32, KvmEvent)> {
    let (head, rest) = line.split_once(": kvm_")?;
    let (comm_tid, after) = head.split_once('(')?;
    let tid: u32 = comm_tid.trim().rsplit_once('-')?.1.parse().ok()?;
    let tgid: u32 = after.split_once(')')?.0.trim().parse().ok()?;
    let (event, fields) = rest.split_once(':')?;
    let mut values: HashMap<&str, u64> = HashMap::new();
    for token in fields.split_whitespace() {
        if let Some((key, hex)) = token.split_once('=') {
            let hex = hex.trim_start_matches("0x");
            values.insert(key, u64::from_str_radix(hex, 16).ok()?);
        }
    }
    let event = match event {
        "pio" => KvmEvent::Pio {
            write: *values.get("rw")? != 0,
            port: *values.get("port")?,
            count: *values.get("count")? as u32,
        },
        "mmio" => KvmEvent::Mmio {
            ty: *values.get("type")? as u32,
            gpa: *values.get("gpa")?,
        },
        "fast_mmio" => KvmEvent::FastMmio {
            gpa: *values.get("gpa")?,
        },
        "userspace_exit" => KvmEvent::Exit {
            reason: *values.get("reason")? as u32,
            // A 4-byte signed field, printed as its unsigned hex.
            errno: i64::from(*values.get("errno")? as u32 as i32),
        },
        _ => return None,
    };
    Some((tgid, tid, event))
}

#[test]
fn parses_tracefs_field_lines() {
    let line = " qemu-system-x86-27851   (  27849) [000] .....  2364.333612: \
                kvm_userspace_exit: reason=0x0 (0) errno=0xfffffffc (-4)";
    assert_eq!(
        parse_trace_line(line),
        Some((
            27849,
            27851,
            KvmEvent::Exit {
                reason: 0,
                errno: -4
            }
        ))
    );
    let line = " qemu-system-x86-27851   (  27849) [001] .....  2364.480855: kvm_mmio: \
                type=0x2 (2) len=0x4 (4) gpa=0xfee000f0 (4276093168) val=0x1ff (511)";
    assert_eq!(
        parse_trace_line(line),
        Some((
            27849,
            27851,
            KvmEvent::Mmio {
                ty: MMIO_WRITE,
                gpa: 0xfee0_00f0
            }
        ))
    );
}

/// Just enough QMP to start a guest created with `-S` and to quit it.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(socket: &Path) -> std::io::Result<Self> {
        use std::io::BufRead as _;
        let stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut qmp = Self {
            reader: std::io::BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }
    fn execute(&mut self, command: &str) -> std::io::Result<()> {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.writer, "{{\"execute\":\"{command}\"}}")?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.contains("\"return\"") {
                return Ok(());
            }
            if line.contains("\"error\"") {
                return Err(std::io::Error::other(line.clone()));
            }
        }
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (reads, writes) that QEMU's device model dispatched for guest vCPUs, per port and per
/// MMIO page, from its own `memory_region_ops_read/write` trace events (log backend,
/// `-D file`), e.g.
/// `memory_region_ops_write cpu 0 mr 0x55f8 addr 0x402 value 0x53 size 1 name 'isa-debugcon'`
/// (`addr` is absolute; ports are below 0x10000, MMIO is far above).
#[derive(Debug, Default)]
struct Dispatches {
    by_port: BTreeMap<u64, (u64, u64)>,
    by_page: BTreeMap<u64, (u64, u64)>,
}

fn qemu_dispatches(log: &str) -> Dispatches {
    let mut out = Dispatches::default();
    for line in log.lines() {
        let mut words = line.split_whitespace();
        let write = match words.next() {
            Some("memory_region_ops_read") => false,
            Some("memory_region_ops_write") => true,
            _ => continue,
        };
        let rest: Vec<&str> = words.collect();
        let value_of = |key: &str| {
            rest.iter()
                .position(|w| *w == key)
                .and_then(|i| rest.get(i + 1))
                .copied()
        };
        // cpu -1: QEMU's own accesses (machine setup), not a guest's.
        if value_of("cpu").is_none_or(|cpu| cpu.starts_with('-')) {
            continue;
        }
        let Some(addr) =
            value_of("addr").and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        else {
            continue;
        };
        let entry = if addr < 0x10000 {
            out.by_port.entry(addr).or_default()
        } else {
            out.by_page.entry(k::page_of(addr)).or_default()
        };
        if write {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    out
}

/// Boots SeaBIOS (no disk: it prints, probes the hardware and stops at "No bootable
/// device.") under KVM with an isa-debugcon at 0x402, counts with the real programs, and
/// checks the counts against
/// 1. the debugcon file: every byte is one guest `out 0x402` that QEMU handled;
/// 2. QEMU's own dispatch trace: user reads/writes per port and per MMIO page, exactly
///    (QEMU's RTC index port 0x70 is coalesced PIO: its writes reach QEMU without an exit
///    and count as in-kernel), and in-kernel ports/pages never reach QEMU;
/// 3. the same run's kvm events recorded by a tracefs instance and replayed through
///    `replay_threads`: identical counters.
#[test]
fn root_kvm_pc_guest_counts_match_ground_truth_and_replay() {
    seabios_under_kvm(
        "root_kvm_pc_guest_counts_match_ground_truth_and_replay",
        "pc",
    );
}

/// As the `pc` test, on `q35`: SeaBIOS then reaches PCI config space through MMCONFIG
/// (MMIO at 0xb0000000), so user MMIO reads and writes are checked too.
#[test]
fn root_kvm_q35_guest_counts_match_ground_truth_and_replay() {
    let c = seabios_under_kvm(
        "root_kvm_q35_guest_counts_match_ground_truth_and_replay",
        "q35",
    );
    if let Some(c) = c {
        assert!(c.mmio_reads_user > 0 && c.mmio_writes_user > 0, "{c:?}");
    }
}

fn seabios_under_kvm(test: &'static str, machine: &str) -> Option<KvmCounts> {
    use std::time::{Duration, Instant};
    let _one_at_a_time = crate::probes::kernel::test_support::attaching();
    let prereq = xtask::prereq::Prereq::new(test);
    prereq.root()?;
    prereq.kvm()?;
    prereq.system_qemu()?;
    let qemu = "qemu-system-x86_64";
    let skip = |why: &str| prereq.missing(why);
    let tracefs = crate::offer::tracefs::ensure_tracefs().expect("tracefs");
    if !tracefs.join("events/kvm").is_dir() {
        return skip("no kvm tracepoints in tracefs");
    }
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let mut ebpf =
        Ebpf::load(crate::probes::kernel::object::EBPF_OBJECT).expect("loading the eBPF object");
    attach(&mut ebpf, &tracefs).expect("attach");

    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    let debugcon = dir.path().join("debugcon.txt");
    let qemu_log = dir.path().join("qemu-trace.log");
    let instance = TraceInstance::new(
        &tracefs,
        &format!("profiler-kvm-test-{}-{machine}", std::process::id()),
    );
    let child = std::process::Command::new(qemu)
        .args([
            "-machine", machine, "-accel", "kvm", "-m", "64", "-smp", "2",
        ])
        .args(["-display", "none"])
        .args(["-nodefaults", "-no-reboot", "-S"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", debugcon.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .args([
            "-trace",
            "memory_region_ops_read",
            "-trace",
            "memory_region_ops_write",
        ])
        .arg("-D")
        .arg(&qemu_log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting qemu");
    let mut qemu_child = KillOnDrop(child);
    let pid = qemu_child.0.id();

    // Watch before the vCPU runs its first instruction, then let it go.
    let mut watch_table = crate::probes::kernel::watch_table::WatchTable::open(&ebpf).unwrap();
    watch_table
        .set(&mut ebpf, pid, 1, profiler_common::wait_block::NONE)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut qmp = loop {
        match Qmp::connect(&qmp_path) {
            Ok(qmp) => break qmp,
            Err(e) => {
                if let Ok(Some(status)) = qemu_child.0.try_wait() {
                    let mut stderr = String::new();
                    use std::io::Read as _;
                    let _ = qemu_child
                        .0
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut stderr);
                    return skip(&format!(
                        "qemu -accel kvm exited ({status}): {}",
                        stderr.trim()
                    ));
                }
                assert!(Instant::now() < deadline, "no QMP: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    qmp.execute("cont").expect("QMP cont");
    // SeaBIOS is done (and idles in a halt loop) once it says so on the debugcon.
    let done = "No bootable device.";
    while !std::fs::read_to_string(&debugcon)
        .unwrap_or_default()
        .contains(done)
    {
        assert!(Instant::now() < deadline, "SeaBIOS never printed `{done}`");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // A clean quit flushes QEMU's trace log.
    let _ = qmp.execute("quit");
    let exit_deadline = Instant::now() + Duration::from_secs(60);
    while qemu_child.0.try_wait().unwrap().is_none() && Instant::now() < exit_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(qemu_child);
    instance.stop();

    // What the eBPF programs counted for this QEMU, plus its outstanding last access.
    let mut counted: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    let counters = crate::probes::kernel::counters::CounterStore::open(&ebpf)
        .unwrap()
        .read(&ebpf)
        .unwrap();
    for (key, n) in counters {
        if key.tgid == pid && k::is_kvm_kind(key.kind) {
            *counted.entry((key.kind, key.id)).or_default() += n;
        }
    }
    let outstanding = outstanding_counts(&ebpf, pid).unwrap();
    let mut total = counted.clone();
    for (key, n) in &outstanding {
        *total.entry(*key).or_insert(0) += n;
    }
    let c = kvm_counts(&total);

    // (1) The debugcon bytes.
    let debug_bytes = std::fs::metadata(&debugcon).unwrap().len();
    assert!(
        debug_bytes > 1000,
        "SeaBIOS wrote only {debug_bytes} debugcon bytes"
    );
    assert_eq!(
        c.by_port.get(&0x402).map_or(0, |rw| rw.1),
        debug_bytes,
        "user PIO writes to 0x402 vs bytes QEMU wrote to the debugcon file"
    );

    // (2) QEMU's own dispatches, port by port and page by page.
    let dispatches = qemu_dispatches(&std::fs::read_to_string(&qemu_log).unwrap());
    let dispatched = &dispatches.by_port;
    let coalesced_rtc_index = 0x70;
    let in_kernel_of = |port: u64| {
        total
            .get(&(KVM_PIO_WRITE_IN_KERNEL, port))
            .copied()
            .unwrap_or(0)
    };
    let mut ports: Vec<u64> = dispatched.keys().chain(c.by_port.keys()).copied().collect();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        let (reads, writes) = c.by_port.get(&port).copied().unwrap_or_default();
        let (q_reads, q_writes) = dispatched.get(&port).copied().unwrap_or_default();
        let coalesced = if port == coalesced_rtc_index {
            in_kernel_of(port)
        } else {
            0
        };
        assert_eq!(
            (reads, writes + coalesced),
            (q_reads, q_writes),
            "port {port:#x}: (user reads, user writes + coalesced) vs QEMU's dispatches"
        );
    }
    for (&(kind, port), n) in &total {
        if (kind == KVM_PIO_READ_IN_KERNEL || kind == KVM_PIO_WRITE_IN_KERNEL)
            && port != coalesced_rtc_index
        {
            assert!(
                !dispatched.contains_key(&port),
                "port {port:#x}: {n} in-kernel accesses, yet QEMU dispatched some"
            );
        }
    }

    let mut pages: Vec<u64> = dispatches
        .by_page
        .keys()
        .chain(c.by_page.keys())
        .copied()
        .collect();
    pages.sort_unstable();
    pages.dedup();
    for page in pages {
        assert_eq!(
            c.by_page.get(&page).copied().unwrap_or_default(),
            dispatches.by_page.get(&page).copied().unwrap_or_default(),
            "MMIO page {page:#x}: (user reads, user writes) vs QEMU's dispatches"
        );
    }
    for (&(kind, page), n) in &total {
        if kind == KVM_MMIO_READ_IN_KERNEL || kind == KVM_MMIO_WRITE_IN_KERNEL {
            assert!(
                !dispatches.by_page.contains_key(&page),
                "MMIO page {page:#x}: {n} in-kernel accesses, yet QEMU dispatched some"
            );
        }
    }

    // (3) The same events, recorded by tracefs and replayed through the shared step().
    assert_eq!(
        instance.overruns(),
        0,
        "the tracefs instance buffer overflowed"
    );
    let trace = std::fs::read_to_string(instance.0.join("trace")).unwrap();
    let events: Vec<(u32, KvmEvent)> = trace
        .lines()
        .filter_map(parse_trace_line)
        .filter(|(tgid, _, _)| *tgid == pid)
        .map(|(_, tid, event)| (tid, event))
        .collect();
    assert!(
        events.len() > 1000,
        "only {} kvm events recorded",
        events.len()
    );
    let replayed = replay_threads(&events);
    assert_eq!(counted, replayed.counted, "eBPF counters vs tracefs replay");
    assert_eq!(
        outstanding, replayed.outstanding,
        "outstanding states vs replay"
    );

    // The in-kernel path saw real traffic too (kernel irqchip: PIC ports, LAPIC page).
    assert!(c.in_kernel > 0 && c.pio_reads_user > 0, "{c:?}");
    eprintln!(
        "{test}: {} kvm events; user PIO reads {} writes {}, user MMIO reads {} writes {}, \
         in-kernel {}, fast MMIO {}; debugcon bytes {debug_bytes}; outstanding {outstanding:x?}",
        events.len(),
        c.pio_reads_user,
        c.pio_writes_user,
        c.mmio_reads_user,
        c.mmio_writes_user,
        c.in_kernel,
        c.fast_mmio
    );
    let in_kernel: Vec<_> = total
        .iter()
        .filter(|((kind, _), _)| {
            k::is_kvm_kind(*kind) && *kind >= KVM_PIO_READ_IN_KERNEL && *kind != KVM_FAST_MMIO
        })
        .collect();
    eprintln!("{test}: in-kernel (kind, id): {in_kernel:x?}");
    for name in PROGRAMS {
        let info = ebpf.program(name).unwrap().info().unwrap();
        let runs = info.run_count();
        eprintln!(
            "{test}: {name}: {runs} runs, {} ns per run",
            info.run_time().as_nanos() / u128::from(runs.max(1))
        );
    }
    Some(c)
}
