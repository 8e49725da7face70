//! Guest-side workload: performs an exact, known number of port reads/writes so the
//! profiler's Read/Write counts can be checked against ground truth.
//!
//! Configured on the kernel command line (read from `/proc/cmdline`):
//!   `workload=OP:PORT:COUNT[,OP:PORT:COUNT...]`  OP is `inb` or `outb`, PORT is hex
//!                                                 (`0x378`) or decimal, COUNT a u64
//!   `workload_delay=SECS`                         seconds to sleep first (default 0)
//!
//! Protocol on /dev/ttyS0 (the host watches the serial log):
//!   `PROFILER-WORKLOAD-START`
//!   `PROFILER-WORKLOAD-TIMING ops=N elapsed_ns=T ns_per_op=X`  (before DONE, so a host
//!                                                               that saw DONE can read it)
//!   `PROFILER-WORKLOAD-DONE ops=N`
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
}

/// Parses a kernel command line. `Ok(None)` means no workload was requested.
fn parse_cmdline(cmdline: &str) -> Result<Option<Config>, String> {
    let mut ops = None;
    let mut delay = Duration::ZERO;
    for arg in cmdline.split_whitespace() {
        if let Some(spec) = arg.strip_prefix("workload=") {
            ops = Some(parse_ops(spec)?);
        } else if let Some(secs) = arg.strip_prefix("workload_delay=") {
            delay = parse_delay(secs)?;
        }
    }
    Ok(ops.map(|ops| Config { ops, delay }))
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
        "PROFILER-WORKLOAD-TIMING ops={total} elapsed_ns={elapsed} ns_per_op={per_op}"
    ));
    serial.line(&format!("PROFILER-WORKLOAD-DONE ops={total}"));
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
