//! The threads of a VM's QEMU process and the kernel workers that serve it, each with the role
//! it plays: what the VM's CPU time is spent on (vCPUs, the device model, kernel workers).
//!
//! Roles come from QEMU's thread names where it names them (`-name debug-threads=on`, which
//! libvirt always sets: `CPU 0/KVM`, `IO iothread0`, `worker`), and otherwise from what a
//! thread does: a thread blocked in the `KVM_RUN` ioctl runs a vCPU. Kernel workers are the
//! process's own kernel-side threads (`vhost-PID`, `kvm-nx-lpage-recovery` on Linux ≥ 6.4:
//! `PF_USER_WORKER`) and the kernel threads named after its PID (`kvm-pit/PID`).

use std::{collections::HashMap, fs, path::Path};

/// What a thread does for its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// Runs a guest vCPU (under KVM its guest time and halts are in this thread).
    Vcpu,
    /// QEMU's main loop or an iothread: the device model.
    DeviceModel,
    /// A kernel thread working for this VM alone (vhost, the in-kernel PIT, NX recovery).
    KernelWorker,
    /// Anything else (RCU, thread-pool workers, VNC, migration).
    Other,
}

/// `PF_USER_WORKER`: a kernel task that lives in a user process (vhost, KVM's NX recovery).
const PF_USER_WORKER: u64 = 0x0000_4000;
/// `KVM_RUN`, the ioctl a vCPU thread spends its life in.
const KVM_RUN: u64 = 0xae80;
/// `ioctl` on x86-64 (the syscall number `/proc/TID/syscall` shows first).
const SYS_IOCTL: u64 = 16;

/// One thread's `/proc/.../stat`: the fields roles and CPU need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadStat {
    pub comm: String,
    pub flags: u64,
    /// User + system CPU time, in clock ticks.
    pub ticks: u64,
    /// The part of it the kernel accounted as guest time.
    pub guest_ticks: u64,
}

/// Parses a thread's (or process's) `stat`. The name (field 2) is in parentheses and may hold
/// spaces (`CPU 0/KVM`), so fields are counted from the last `)`.
pub fn parse_thread_stat(content: &str) -> Option<ThreadStat> {
    let open = content.find('(')?;
    let close = content.rfind(')')?;
    let comm = content.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = content[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ThreadStat {
        comm,
        flags: field(9)?,
        ticks: field(14)? + field(15)?,
        guest_ticks: field(43).unwrap_or(0),
    })
}

/// The role a thread's name and flags tell, `None` when they tell nothing (QEMU without
/// `debug-threads=on` names every thread after its executable).
pub fn role_by_name(stat: &ThreadStat, tid: u32, pid: u32) -> Option<ThreadRole> {
    if stat.flags & PF_USER_WORKER != 0 {
        return Some(ThreadRole::KernelWorker);
    }
    let comm = stat.comm.as_str();
    // `CPU 0/KVM`, `CPU 3/TCG`: QEMU's vCPU threads with debug-threads=on.
    if comm.starts_with("CPU ") && comm.contains('/') {
        return Some(ThreadRole::Vcpu);
    }
    if tid == pid || comm.starts_with("IO ") {
        return Some(ThreadRole::DeviceModel);
    }
    if comm.starts_with("qemu-system") || comm.starts_with("qemu-kvm") || comm == "kvm" {
        return None;
    }
    Some(ThreadRole::Other)
}

/// Whether `/proc/TID/syscall` shows the thread blocked in `ioctl(fd, KVM_RUN)`.
pub fn in_kvm_run(syscall: &str) -> bool {
    let mut fields = syscall.split_whitespace();
    let number = fields.next().and_then(|n| n.parse::<u64>().ok());
    let request = fields
        .nth(1)
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
    number == Some(SYS_IOCTL) && request == Some(KVM_RUN)
}

/// The VM whose PID a kernel thread's name carries: `kvm-pit/PID`, `vhost-PID` (vhost workers
/// were kernel threads before Linux 6.4).
pub fn kernel_worker_owner(comm: &str) -> Option<u32> {
    if let Some(pid) = comm.strip_prefix("kvm-pit/") {
        return pid.parse().ok();
    }
    comm.strip_prefix("vhost-")?.parse().ok()
}

/// One thread of a VM as read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSample {
    pub tid: u32,
    pub role: ThreadRole,
    /// Whether `role` is known for good (a name, or seen in `KVM_RUN`): kept for the thread's
    /// life instead of asked again.
    pub settled: bool,
    pub ticks: u64,
    pub guest_ticks: u64,
}

/// Reads every thread of process `pid` under `proc_root`, reusing the `settled` roles of threads
/// seen before. `None` when the process is gone.
pub fn read_threads(
    proc_root: &Path,
    pid: u32,
    settled: &HashMap<u32, ThreadRole>,
) -> Option<Vec<ThreadSample>> {
    let task = proc_root.join(pid.to_string()).join("task");
    let entries = fs::read_dir(&task).ok()?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(stat) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_thread_stat(&s))
        else {
            continue; // exited meanwhile
        };
        let (role, now_settled) = match settled.get(&tid) {
            Some(role) => (*role, true),
            None => match role_by_name(&stat, tid, pid) {
                Some(role) => (role, true),
                None => {
                    let syscall =
                        fs::read_to_string(entry.path().join("syscall")).unwrap_or_default();
                    if in_kvm_run(&syscall) {
                        (ThreadRole::Vcpu, true)
                    } else {
                        // Running, or blocked elsewhere: ask again next time.
                        (ThreadRole::Other, false)
                    }
                }
            },
        };
        out.push(ThreadSample {
            tid,
            role,
            settled: now_settled,
            ticks: stat.ticks,
            guest_ticks: stat.guest_ticks,
        });
    }
    Some(out)
}

/// One kernel thread working for one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelWorkerSample {
    /// The VM's QEMU process.
    pub owner: u32,
    /// The kernel thread.
    pub tid: u32,
    pub ticks: u64,
}

/// The kernel threads named after a VM (children of `kthreadd`), found once each.
#[derive(Debug, Default)]
pub struct KernelWorkers {
    /// Kernel threads seen, with the VM each works for (`None`: no VM's).
    owners: HashMap<u32, Option<u32>>,
}

impl KernelWorkers {
    /// Every kernel thread now working for some VM, with its CPU time so far.
    pub fn read(&mut self, proc_root: &Path) -> Vec<KernelWorkerSample> {
        let children = fs::read_to_string(proc_root.join("2/task/2/children")).unwrap_or_default();
        let tids: Vec<u32> = children
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        self.owners.retain(|tid, _| tids.contains(tid));
        let mut out = Vec::new();
        for tid in tids {
            if self.owners.get(&tid) == Some(&None) {
                continue;
            }
            let Some(stat) = fs::read_to_string(proc_root.join(tid.to_string()).join("stat"))
                .ok()
                .and_then(|s| parse_thread_stat(&s))
            else {
                continue;
            };
            // The name is read with the CPU time, so a reused thread ID is caught at once.
            let owner = kernel_worker_owner(&stat.comm);
            self.owners.insert(tid, owner);
            if let Some(owner) = owner {
                out.push(KernelWorkerSample {
                    owner,
                    tid,
                    ticks: stat.ticks,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
