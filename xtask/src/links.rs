//! The probe links a process holds, counted from outside through `/proc`: for the tests and
//! benchmarks that check the profiler leaves nothing behind. The profiler keeps its
//! multi-uprobe links in threads with descriptor tables of their own, so every thread's table
//! is read.

/// The probe links a process holds, by scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeLinks {
    /// BPF links and per-site perf events that probe one process or are host-wide.
    pub scoped: usize,
    /// Multi-uprobe links with no process: a binary's, shared by its VMs (the profiler's
    /// `probes/kernel/shared_links.rs`).
    pub binary_wide: usize,
}

/// The probe links process `pid` holds: its BPF links in every descriptor table of its
/// threads (each counted once, by its link ID) and the perf events in its own table (per-site
/// uprobes). For tests and benchmarks that check nothing is left behind.
pub fn probe_links(pid: u32) -> usize {
    let links = probe_links_by_scope(pid);
    links.scoped + links.binary_wide
}

/// [`probe_links`], the binary-wide ones apart.
pub fn probe_links_by_scope(pid: u32) -> ProbeLinks {
    let mut bpf_links = std::collections::BTreeMap::new();
    let mut perf_events = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for task in tasks {
        let leader = task.ends_with(pid.to_string());
        let Ok(fds) = std::fs::read_dir(task.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            match target.to_string_lossy().as_ref() {
                "anon_inode:bpf_link" => {
                    let info = std::fs::read_to_string(task.join("fdinfo").join(fd.file_name()))
                        .unwrap_or_default();
                    let field = |name: &str| {
                        info.lines()
                            .find_map(|l| Some(l.strip_prefix(name)?.trim().to_string()))
                    };
                    if let Some(id) = field("link_id:") {
                        let binary_wide = field("link_type:").as_deref() == Some("uprobe_multi")
                            && field("pid:").as_deref() == Some("0");
                        bpf_links.insert(id, binary_wide);
                    }
                }
                "anon_inode:[perf_event]" if leader => perf_events += 1,
                _ => {}
            }
        }
    }
    let binary_wide = bpf_links.values().filter(|&&b| b).count();
    ProbeLinks {
        scoped: bpf_links.len() - binary_wide + perf_events,
        binary_wide,
    }
}
