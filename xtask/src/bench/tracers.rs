//! The tracers a benchmark compares, started and stopped around each measurement: the
//! profiler itself, and bpftrace (what an operator would use instead).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A running tracer, stopped (SIGINT, then SIGKILL) on drop.
pub struct Tracer {
    child: Child,
    /// The profiler's records, when the tracer is the profiler.
    pub records: Option<PathBuf>,
}

impl Tracer {
    /// `profiler record --window 1 ARGS --vm VMS.. --output DIR/NAME.jsonl`, returned once it
    /// has written a window for each of `running` (so their probes are attached).
    pub fn profiler(
        profiler: &Path,
        args: &[&str],
        vms: &[&str],
        running: &[&str],
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        let records = dir.join(format!("{name}.jsonl"));
        let _ = std::fs::remove_file(&records);
        let mut cmd = Command::new(profiler);
        cmd.args(["record", "--window", "1"]).args(args);
        super::die_with_parent(&mut cmd, libc::SIGTERM);
        for vm in vms {
            cmd.args(["--vm", vm]);
        }
        let child = cmd
            .arg("--output")
            .arg(&records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting profiler record")?;
        let tracer = Self {
            child,
            records: Some(records.clone()),
        };
        tracer.wait_records(running.iter().map(|vm| format!("\"name\":\"{vm}\"")))?;
        Ok(tracer)
    }

    /// Waits until the records mention each of `needles` (a VM name or `"pid":N`).
    pub fn wait_records(&self, needles: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
        let records = self.records.as_ref().context("not the profiler")?;
        let needles: Vec<String> = needles.into_iter().collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(records).unwrap_or_default();
            if needles.iter().all(|n| text.contains(n.as_str())) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the profiler did not record {needles:?} within 60 s");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// `bpftrace -e SCRIPT` (with `-p PID` for USDT probes), returned once its probes are
    /// attached.
    pub fn bpftrace(script: &str, pid: Option<u32>) -> anyhow::Result<Self> {
        let mut cmd = Command::new("bpftrace");
        if let Some(pid) = pid {
            cmd.args(["-p", &pid.to_string()]);
        }
        let mut child = cmd
            .args(["-e", script])
            .stdout(Stdio::piped())
            // Its complaint that it cannot raise RLIMIT_MEMLOCK (not needed since Linux 5.11)
            // would clutter the output; a failure shows as no "Attaching" line.
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace (apt install bpftrace)")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Attaching") {
                    let _ = tx.send(());
                }
            }
        });
        let tracer = Self {
            child,
            records: None,
        };
        rx.recv_timeout(Duration::from_secs(60))
            .context("bpftrace did not attach within 60 s")?;
        // "Attaching" is printed before the last probe is in place.
        sleep(Duration::from_millis(500));
        Ok(tracer)
    }

    /// Stops it (SIGINT, as Ctrl-C would) and waits.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop_inner();
        }
    }
}
