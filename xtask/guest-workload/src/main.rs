//! Guest-side workload: performs an exact, known number of port reads/writes so the
//! profiler's Read/Write counts can be checked against ground truth.
//!
//! Configured on the kernel command line (read from `/proc/cmdline`):
//!   `workload=OP:PORT:COUNT[,OP:PORT:COUNT...]`  OP is `inb` or `outb`, PORT is hex
//!                                                 (`0x378`) or decimal, COUNT a u64
//!   `workload_delay=SECS`                         seconds to sleep first (default 0)
//!   `workload_rounds=K`                           do the ops K times (default 1)
//!   `workload_sync=DEV`                           before each round, read a line from DEV
//!                                                 (a second serial port the host writes to
//!                                                 once its tracer is attached)
//!
//! Protocol on /dev/ttyS0 (the host watches the serial log):
//!   `PROFILER-WORKLOAD-START`
//!   `PROFILER-WORKLOAD-WAITING round=I`           (with workload_sync: ready for the go line)
//!   `PROFILER-WORKLOAD-TIMING ops=N elapsed_ns=T ns_per_op=X round=I`  (per round, before
//!                                                  DONE, so a host that saw DONE can read it)
//!   `PROFILER-WORKLOAD-DONE ops=N`                 (N: all rounds)
//!   `PROFILER-WORKLOAD-ERROR <reason>`  on failure (exit status 1)
//! Without `workload=` on the command line it does nothing and exits 0.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Inb,
    Outb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    kind: OpKind,
    port: u16,
    count: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct Config {
    ops: Vec<Op>,
    delay: Duration,
    rounds: u32,
    sync: Option<String>,
}

/// Parses a kernel command line. `Ok(None)` means no workload was requested.
fn parse_cmdline(cmdline: &str) -> Result<Option<Config>, String> {
    let mut ops = None;
    let mut delay = Duration::ZERO;
    let mut rounds = 1;
    let mut sync = None;
    for arg in cmdline.split_whitespace() {
        if let Some(spec) = arg.strip_prefix("workload=") {
            ops = Some(parse_ops(spec)?);
        } else if let Some(secs) = arg.strip_prefix("workload_delay=") {
            delay = parse_delay(secs)?;
        } else if let Some(k) = arg.strip_prefix("workload_rounds=") {
            rounds = k
                .parse()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| format!("bad workload_rounds `{k}` (a count > 0)"))?;
        } else if let Some(dev) = arg.strip_prefix("workload_sync=") {
            sync = Some(dev.to_string());
        }
    }
    Ok(ops.map(|ops| Config {
        ops,
        delay,
        rounds,
        sync,
    }))
}

fn parse_ops(spec: &str) -> Result<Vec<Op>, String> {
    if spec.is_empty() {
        return Err("workload= is empty".into());
    }
    spec.split(',').map(parse_op).collect()
}

fn parse_op(item: &str) -> Result<Op, String> {
    let mut parts = item.split(':');
    let (Some(op), Some(port), Some(count), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("`{item}`: expected OP:PORT:COUNT"));
    };
    let kind = match op {
        "inb" => OpKind::Inb,
        "outb" => OpKind::Outb,
        _ => return Err(format!("`{item}`: unknown op `{op}` (inb or outb)")),
    };
    let port = parse_port(port).ok_or_else(|| format!("`{item}`: bad port `{port}`"))?;
    let count = count
        .parse()
        .map_err(|_| format!("`{item}`: bad count `{count}`"))?;
    Ok(Op { kind, port, count })
}

fn parse_port(s: &str) -> Option<u16> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("bad workload_delay `{s}` (seconds, >= 0)"))
}

/// Writes protocol lines to the serial port directly, so they reach the host's serial log
/// whatever stdout is; falls back to stdout when run outside the test guest.
struct Serial(Box<dyn Write>);

impl Serial {
    fn open() -> Self {
        match OpenOptions::new().write(true).open("/dev/ttyS0") {
            Ok(tty) => Self(Box::new(tty)),
            Err(_) => Self(Box::new(std::io::stdout())),
        }
    }

    fn line(&mut self, text: &str) {
        // One write per line, so kernel messages are less likely to split it.
        let _ = self.0.write_all(format!("{text}\n").as_bytes());
        let _ = self.0.flush();
    }
}

fn main() -> ExitCode {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut serial = Serial::open();
    let config = match parse_cmdline(&cmdline) {
        Ok(Some(config)) => config,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            serial.line(&format!("PROFILER-WORKLOAD-ERROR {e}"));
            return ExitCode::FAILURE;
        }
    };
    std::thread::sleep(config.delay);
    serial.line("PROFILER-WORKLOAD-START");
    if let Err(e) = enable_port_io() {
        serial.line(&format!("PROFILER-WORKLOAD-ERROR {e}"));
        return ExitCode::FAILURE;
    }
    let mut sync = match config.sync.as_deref().map(std::fs::File::open) {
        Some(Ok(f)) => Some(std::io::BufReader::new(f)),
        Some(Err(e)) => {
            serial.line(&format!(
                "PROFILER-WORKLOAD-ERROR opening the sync port: {e}"
            ));
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let mut all = 0u64;
    for round in 0..config.rounds {
        if let Some(sync) = &mut sync {
            use std::io::BufRead as _;
            serial.line(&format!("PROFILER-WORKLOAD-WAITING round={round}"));
            let mut line = String::new();
            if sync.read_line(&mut line).unwrap_or(0) == 0 {
                serial.line("PROFILER-WORKLOAD-ERROR the sync port closed");
                return ExitCode::FAILURE;
            }
        }
        let started = Instant::now();
        let mut total = 0u64;
        for op in &config.ops {
            run_op(op);
            total += op.count;
        }
        let elapsed = started.elapsed().as_nanos();
        let per_op = if total == 0 {
            0
        } else {
            elapsed / u128::from(total)
        };
        serial.line(&format!(
            "PROFILER-WORKLOAD-TIMING ops={total} elapsed_ns={elapsed} ns_per_op={per_op} \
             round={round}"
        ));
        all += total;
    }
    serial.line(&format!("PROFILER-WORKLOAD-DONE ops={all}"));
    ExitCode::SUCCESS
}

fn enable_port_io() -> Result<(), String> {
    // iopl(3) opens every port; the guest kernel (CONFIG_X86_IOPL_IOPERM=y) emulates it
    // with the I/O bitmap, so this needs only CAP_SYS_RAWIO, which /init's children have.
    // SAFETY: plain syscall wrapper; no memory is passed.
    if unsafe { libc::iopl(3) } == 0 {
        Ok(())
    } else {
        Err(format!("iopl(3): {}", std::io::Error::last_os_error()))
    }
}

#[cfg(not(target_arch = "x86_64"))]
compile_error!("guest-workload performs x86 port I/O; build it for x86_64");

#[cfg(target_arch = "x86_64")]
fn run_op(op: &Op) {
    use std::arch::asm;
    // Each iteration is exactly one `in`/`out` instruction: asm! blocks without `pure` are
    // never merged or elided, so the guest performs exactly `count` accesses.
    match op.kind {
        OpKind::Inb => {
            for _ in 0..op.count {
                // SAFETY: port I/O was enabled by iopl; reading a port has no memory effects.
                unsafe {
                    asm!("in al, dx", out("al") _, in("dx") op.port,
                         options(nomem, nostack, preserves_flags));
                }
            }
        }
        OpKind::Outb => {
            for _ in 0..op.count {
                // SAFETY: as above; the value written (0) is irrelevant to the count.
                unsafe {
                    asm!("out dx, al", in("dx") op.port, in("al") 0u8,
                         options(nomem, nostack, preserves_flags));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_workload_means_none() {
        assert_eq!(parse_cmdline("").unwrap(), None);
        assert_eq!(
            parse_cmdline("console=ttyS0 quiet panic=-1 workload_delay=3").unwrap(),
            None
        );
    }

    #[test]
    fn single_op_hex_port_and_delay() {
        let c = parse_cmdline("console=ttyS0 workload=inb:0x378:100000 workload_delay=2\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            c.ops,
            vec![Op {
                kind: OpKind::Inb,
                port: 0x378,
                count: 100_000
            }]
        );
        assert_eq!(c.delay, Duration::from_secs(2));
    }

    #[test]
    fn several_ops_decimal_port_default_delay() {
        let c = parse_cmdline("workload=outb:888:5,inb:0X3F8:0")
            .unwrap()
            .unwrap();
        assert_eq!(
            c.ops,
            vec![
                Op {
                    kind: OpKind::Outb,
                    port: 888,
                    count: 5
                },
                Op {
                    kind: OpKind::Inb,
                    port: 0x3f8,
                    count: 0
                },
            ]
        );
        assert_eq!(c.delay, Duration::ZERO);
    }

    #[test]
    fn rounds_and_sync_port() {
        let c = parse_cmdline("workload=inb:0x378:10 workload_rounds=12 workload_sync=/dev/ttyS1")
            .unwrap()
            .unwrap();
        assert_eq!((c.rounds, c.sync.as_deref()), (12, Some("/dev/ttyS1")));
        let c = parse_cmdline("workload=inb:0x378:10").unwrap().unwrap();
        assert_eq!((c.rounds, c.sync), (1, None));
        for bad in ["workload_rounds=0", "workload_rounds=x"] {
            assert!(
                parse_cmdline(&format!("workload=inb:1:1 {bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn fractional_delay() {
        let c = parse_cmdline("workload_delay=0.5 workload=inb:1:1")
            .unwrap()
            .unwrap();
        assert_eq!(c.delay, Duration::from_millis(500));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "workload=",
            "workload=inb:0x378",
            "workload=inb:0x378:1:2",
            "workload=inw:0x378:1",
            "workload=inb:0x10000:1",
            "workload=inb:0xzz:1",
            "workload=inb:0x378:-1",
            "workload=inb:0x378:1,",
            "workload=inb:1:1 workload_delay=-1",
            "workload=inb:1:1 workload_delay=soon",
        ] {
            assert!(parse_cmdline(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn similar_names_are_not_workload() {
        assert_eq!(
            parse_cmdline("myworkload=inb:1:1 xworkload_delay=1").unwrap(),
            None
        );
    }
}
