//! The host-wide procfs files the profiler reads: `/proc/stat` (its busy CPU, sampled at the
//! tick), the root `cpuacct` cgroup (its busy CPU, exactly: the scheduler's runtime of every
//! task), `/proc/meminfo` (its memory) and a process's `statm` (its resident memory).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The host's CPU time so far, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// Clock ticks all CPUs spent neither idle nor waiting for I/O (guest time is part of user
    /// time already).
    pub busy_ticks: u64,
    /// Online CPUs (`cpuN` lines).
    pub cpus: u32,
}

/// Parses `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal guest guest_nice`.
pub fn parse_proc_stat(text: &str) -> Option<HostCpu> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle [iowait irq softirq steal]; guest and guest_nice are already
    // counted in user and nice.
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let cpus = lines
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count() as u32;
    Some(HostCpu {
        busy_ticks: total.saturating_sub(idle),
        cpus: cpus.max(1),
    })
}

/// The resident size of `/proc/PID/statm` (its second field, in pages), in bytes.
pub fn parse_statm_resident(text: &str) -> Option<u64> {
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * if page > 0 { page as u64 } else { 4096 })
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(text: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The host's CPU time so far.
///
/// `/proc/stat` is kept open: each refresh re-reads it from offset 0 (`pread` regenerates a
/// proc file), without the open and close that were half its cost.
#[derive(Debug, Default)]
pub struct HostCpuReader {
    file: Option<fs::File>,
    buf: Vec<u8>,
}

impl HostCpuReader {
    pub fn read(&mut self, proc_root: &Path) -> Option<HostCpu> {
        use std::os::unix::fs::FileExt as _;
        if self.file.is_none() {
            self.file = fs::File::open(proc_root.join("stat")).ok();
        }
        let file = self.file.as_ref()?;
        self.buf.clear();
        let mut chunk = [0u8; 16384];
        loop {
            match file.read_at(&mut chunk, self.buf.len() as u64) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    self.file = None;
                    return None;
                }
            }
        }
        parse_proc_stat(std::str::from_utf8(&self.buf).ok()?)
    }
}

/// Where the root of a cgroup v1 `cpuacct` hierarchy is mounted, from a `mountinfo`: a
/// `cgroup` mount whose options hold `cpuacct` and whose root is the hierarchy's own.
pub fn parse_cpuacct_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        let (fstype, _source, options) = (fs.next()?, fs.next()?, fs.next()?);
        let mut fields = mount.split_whitespace();
        let (root, point) = (fields.nth(3)?, fields.next()?);
        (fstype == "cgroup" && root == "/" && options.split(',').any(|o| o == "cpuacct"))
            .then(|| PathBuf::from(point))
    })
}

/// The scheduler's runtime of every task on the host, from the root `cpuacct` cgroup's
/// `cpuacct.usage` (nanoseconds): the same clock a process's CPU time is kept in, so the
/// host's busy time read this way is never below what its processes used. Kept open, read
/// from offset 0 each time.
#[derive(Debug, Default)]
pub struct CpuacctReader {
    file: Option<fs::File>,
    looked: bool,
}

impl CpuacctReader {
    /// Nanoseconds of every task's runtime so far; `None` where no cgroup v1 `cpuacct`
    /// hierarchy is mounted (cgroup2-only hosts).
    pub fn read(&mut self, proc_root: &Path) -> Option<u64> {
        use std::os::unix::fs::FileExt as _;
        if !self.looked {
            self.looked = true;
            self.file = fs::read_to_string(proc_root.join("self/mountinfo"))
                .ok()
                .and_then(|m| parse_cpuacct_root(&m))
                .and_then(|root| fs::File::open(root.join("cpuacct.usage")).ok());
        }
        let mut buf = [0u8; 32];
        let n = self.file.as_ref()?.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpuacct_hierarchy_root_is_found_in_mountinfo() {
        // This machine's (Debian, no systemd): v1 controllers under /sys/fs/cgroup.
        let mountinfo = "25 30 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            27 25 0:25 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
            28 25 0:26 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
            35 25 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cpuacct_root(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/cpuacct"))
        );
        // systemd's combined controllers.
        let combined =
            "30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            parse_cpuacct_root(combined),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        // A container's view (not the hierarchy's root), cgroup2 only: none.
        let nested = "30 25 0:27 /docker/abc /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
            35 25 0:33 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cpuacct_root(nested), None);
    }

    #[test]
    fn proc_stat_busy_time_and_cpus() {
        let text = "cpu  100 5 50 1000 20 3 2 1 40 0\ncpu0 50 2 25 500 10 1 1 0 20 0\n\
                    cpu1 50 3 25 500 10 2 1 1 20 0\nintr 12345\nctxt 999\n";
        let h = parse_proc_stat(text).unwrap();
        // user+nice+system+irq+softirq+steal = 100+5+50+3+2+1; idle and iowait excluded.
        assert_eq!(
            h,
            HostCpu {
                busy_ticks: 161,
                cpus: 2
            }
        );
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        assert_eq!(
            parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(
            parse_statm_resident("77172 6224 3300 1431 0 14690 0\n"),
            Some(6224 * 4096)
        );
        assert_eq!(parse_statm_resident("77172"), None);
        assert_eq!(parse_proc_stat("cpu 1 2\n"), None);
    }
}
