//! What the host must grant before anything loads: the capabilities eBPF needs (with an error a
//! person can act on), and enough file descriptors for a link per uprobe of every VM.

use anyhow::bail;

/// Capabilities the profiler uses: (number, name, what for).
const NEEDED_CAPS: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "loading eBPF programs and maps"),
    (38, "CAP_PERFMON", "attaching tracepoints and uprobes"),
    (
        21,
        "CAP_SYS_ADMIN",
        "mounting tracefs, BPF run-time statistics",
    ),
    (19, "CAP_SYS_PTRACE", "reading QEMU's executable and memory"),
];

/// The effective capability set from `/proc/self/status` (`CapEff:` in hex).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The capabilities of `NEEDED_CAPS` missing from `effective`, by name and purpose.
pub fn missing_caps(effective: u64) -> Vec<(&'static str, &'static str)> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

/// Checks the privileges loading eBPF needs, with an error a person can act on: which
/// capabilities are missing and what each is for.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(effective) = parse_cap_eff(&status) else {
        bail!("cannot read this process's capabilities from /proc/self/status");
    };
    let missing = missing_caps(effective);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect();
    // SAFETY: geteuid has no preconditions.
    let who = if unsafe { libc::geteuid() } == 0 {
        "running as root, but without"
    } else {
        "not root, and without"
    };
    bail!(
        "recording needs root or these capabilities: {who} {}. Run it with sudo (or grant the \
         capabilities, e.g. in a systemd unit's AmbientCapabilities).",
        list.join(", ")
    );
}

/// Raises this process's open-file limit to its hard limit: each watched VM holds a BPF link
/// per uprobe (the libc waits alone are 6) and a kept `/proc` handle, so 2,000 VMs need
/// over 14,000 descriptors where the usual soft limit is 1,024. Returns the limit now.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let now = raise_fd_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((now, lim.rlim_cur), (lim.rlim_max, lim.rlim_max));
    }

    #[test]
    fn capabilities_missing_by_name() {
        let status = "Name:\tprofiler\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert!(missing_caps(0x1ff_ffff_ffff).is_empty());
        let no_bpf = 0x1ff_ffff_ffff & !(1 << 39) & !(1 << 38);
        let missing: Vec<&str> = missing_caps(no_bpf).iter().map(|m| m.0).collect();
        assert_eq!(missing, ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(0).len(), 4);
        assert_eq!(parse_cap_eff("CapEff: zz"), None);
    }
}
