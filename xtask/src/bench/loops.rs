//! Syscall loops whose time per call shows what a tracer costs a process: a `getppid` loop
//! (any syscall: the slow syscall path), a zero-timeout `ppoll` loop (a wait function, what
//! QEMU's main loop calls ~4,500 times a second on a UHCI-tablet guest). Run unrelated, or
//! named like QEMU so the profiler watches them.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// What a loop calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    Getppid,
    /// `ppoll(NULL, 0, {0,0}, NULL)`: returns at once.
    PpollZero,
    /// `ppoll(NULL, 0, {0,20µs}, NULL)`: sleeps and times out, as QEMU's timer waits do; its
    /// figure is CPU time per call (the sleep is not a cost).
    PpollTimed,
    /// A round trip of one byte through two pipes to a second thread on the same CPU and
    /// back: each side sleeps in `read` and is woken, a context switch each way (what every
    /// task that blocks pays a `sched:sched_switch` program for); CPU time of the calling
    /// thread.
    PipeRoundTrip,
}

impl LoopKind {
    pub fn arg(self) -> &'static str {
        match self {
            LoopKind::Getppid => "getppid",
            LoopKind::PpollZero => "ppoll",
            LoopKind::PpollTimed => "ppoll-timed",
            LoopKind::PipeRoundTrip => "pipe-round-trip",
        }
    }
}

/// `xtask syscall-loop --kind getppid|ppoll --calls N [--go PATH]`: (after PATH exists) makes
/// N calls and prints `ns_per_call=X`: CPU ns per call of the fastest of 20 chunks for the
/// zero-timeout loops, CPU ns per call of the fastest chunk for the timed one too.
pub fn syscall_loop_main(args: &[String]) -> anyhow::Result<()> {
    let value = |name: &str| -> Option<&String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let kind = match value("--kind").map(String::as_str) {
        Some("getppid") => LoopKind::Getppid,
        Some("ppoll") => LoopKind::PpollZero,
        Some("ppoll-timed") => LoopKind::PpollTimed,
        Some("pipe-round-trip") => LoopKind::PipeRoundTrip,
        other => bail!("--kind getppid|ppoll|ppoll-timed|pipe-round-trip, not {other:?}"),
    };
    let calls: u64 = value("--calls")
        .context("--calls N")?
        .parse()
        .context("--calls takes a count")?;
    if let Some(go) = value("--go") {
        while !Path::new(go).exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let timed = libc::timespec {
        tv_sec: 0,
        tv_nsec: 20_000,
    };
    let ns = match kind {
        LoopKind::Getppid => fastest_chunk(calls, || {
            // SAFETY: no arguments; glibc does not cache getppid, each call is a syscall.
            std::hint::black_box(unsafe { libc::getppid() });
        }),
        LoopKind::PpollZero => fastest_chunk(calls, || {
            // SAFETY: no fds; a valid timespec; no signal mask.
            std::hint::black_box(unsafe {
                libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null())
            });
        }),
        LoopKind::PpollTimed => fastest_chunk(calls, || {
            // SAFETY: as above.
            std::hint::black_box(unsafe {
                libc::ppoll(std::ptr::null_mut(), 0, &timed, std::ptr::null())
            });
        }),
        LoopKind::PipeRoundTrip => pipe_round_trips(calls)?,
    };
    println!("ns_per_call={ns:.1}");
    Ok(())
}

/// CPU ns per round trip (fastest chunk) of one byte to an echo thread and back, both threads
/// on one CPU: each round trip is two context switches from one thread straight to the other
/// (on two CPUs it would be four, through the idle task and a wake-up interrupt, whose cost
/// depends on where the scheduler puts them each time).
fn pipe_round_trips(calls: u64) -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread (the echo thread, spawned
    // next, inherits it).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let (mut to_echo_r, mut to_echo_w) = std::io::pipe()?;
    let (mut from_echo_r, mut from_echo_w) = std::io::pipe()?;
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while to_echo_r.read_exact(&mut b).is_ok() && from_echo_w.write_all(&b).is_ok() {}
    });
    let mut failed = None;
    let ns = fastest_chunk(calls, || {
        let mut b = [1u8; 1];
        if let Err(e) = to_echo_w
            .write_all(&b)
            .and_then(|()| from_echo_r.read_exact(&mut b))
        {
            failed.get_or_insert(e);
        }
    });
    drop(to_echo_w);
    let _ = echo.join();
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(ns),
    }
}

/// Chunks a zero-timeout loop is cut into; its figure is the fastest chunk's.
const CHUNKS: u64 = 20;

/// Thread CPU ns per call of the fastest of [`CHUNKS`] chunks of `calls` calls. On a shared
/// machine other work preempts the loop and interrupts land in it at random; CPU time leaves
/// the preemption out, the fastest chunk the interrupts. A tax every call pays (the slow
/// syscall path, a uprobe's traps) is in every chunk, so in this figure too.
fn fastest_chunk(calls: u64, mut call: impl FnMut()) -> f64 {
    let per_chunk = (calls / CHUNKS).max(1);
    (0..CHUNKS)
        .map(|_| {
            let before = thread_cpu_ns();
            for _ in 0..per_chunk {
                call();
            }
            (thread_cpu_ns() - before) / per_chunk as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// CPU time of the calling thread, ns (`CLOCK_THREAD_CPUTIME_ID`: the scheduler's clock, not
/// tick-sampled).
fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Runs a loop in a new process and returns its ns per call (CPU ns for a timed loop). `qemu_name`: named like QEMU
/// (`-name guest=NAME`), so a profiler selecting that name watches it; it starts only once
/// `go` exists, so a tracer can attach to it first (`ready` is called with its pid).
pub fn run_loop(
    kind: LoopKind,
    calls: u64,
    qemu_name: Option<&str>,
    go: Option<&Path>,
    ready: impl FnOnce(u32) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    if qemu_name.is_some() {
        cmd.arg0("qemu-system-x86_64");
    }
    cmd.args(["syscall-loop", "--kind", kind.arg(), "--calls"])
        .arg(calls.to_string());
    if let Some(go) = go {
        let _ = std::fs::remove_file(go);
        cmd.arg("--go").arg(go);
    }
    if let Some(name) = qemu_name {
        cmd.args(["-name", &format!("guest={name}")]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a syscall loop")?;
    ready(child.id())?;
    if let Some(go) = go {
        std::fs::write(go, "")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the syscall loop failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("ns_per_call=")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected loop output {text:?}"))
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }
}
