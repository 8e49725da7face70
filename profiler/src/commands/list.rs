use std::process::ExitCode;

use serde::Serialize;

use crate::text::clean;
use crate::{
    identity::{
        cmdline::QmpEndpoint,
        discovery::{HostPaths, scan_qemu_processes},
    },
    offer::{exe::ExeCatalog, kernel::KernelOffer, libc::LibcCatalog, offered_sources},
    probes::ProbeOptions,
    record::Sources,
};

#[derive(Serialize)]
struct ListedVm {
    name: String,
    pid: u32,
    uuid: Option<String>,
    xen_domid: Option<u32>,
    accel: String,
    exe: String,
    devices: Vec<String>,
    qmp: Vec<QmpEndpoint>,
    sources: Sources,
    /// Where QEMU's symbols come from, or where a debug file was looked for.
    symbols: String,
    /// The libvirt domain and, for OpenStack guests, the Nova instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    libvirt: Option<crate::identity::libvirt::LibvirtDomain>,
}

/// What the kernel offers, as `record` would find it (only asked when a VM runs: it may
/// mount tracefs).
fn kernel_offer() -> KernelOffer {
    match crate::offer::tracefs::ensure_tracefs() {
        Ok(tracefs) => KernelOffer::of_host(&tracefs),
        Err(e) => {
            let why = Err(format!("{e:#}"));
            KernelOffer {
                hrtimer: why.clone(),
                hrtimer_start: why.clone(),
                kvm: why.clone(),
                guest: crate::offer::kvm::KvmOffer {
                    vcpu_wakeups: why.clone(),
                    exits: why,
                },
            }
        }
    }
}

pub fn run(json: bool, options: ProbeOptions) -> anyhow::Result<ExitCode> {
    let procs = scan_qemu_processes(&HostPaths::default());
    // Reading a QEMU binary's notes and symbols costs tens of MB of I/O: once per binary.
    let mut catalog = ExeCatalog::new(options.debug_roots);
    let mut libc_catalog = LibcCatalog::default();
    let kernel = if procs.is_empty() {
        KernelOffer::all()
    } else {
        kernel_offer()
    };
    let vms: Vec<ListedVm> = procs
        .iter()
        .map(|p| {
            let offered = offered_sources(
                &mut catalog,
                &mut libc_catalog,
                options.timer_choice,
                p,
                &kernel,
            );
            ListedVm {
                name: p.identity.name.clone(),
                pid: p.key.pid,
                uuid: p.identity.uuid.clone(),
                xen_domid: p.identity.xen_domid,
                accel: p.identity.accel.to_string(),
                exe: p.exe.display().to_string(),
                devices: p.cmdline.devices.clone(),
                qmp: p.cmdline.qmp.clone(),
                sources: offered.sources.record(),
                symbols: offered.symbols,
                libvirt: p.identity.libvirt.clone(),
            }
        })
        .collect();
    if json {
        for vm in &vms {
            println!("{}", serde_json::to_string(vm)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if vms.is_empty() {
        println!("no QEMU processes found");
        return Ok(ExitCode::SUCCESS);
    }
    let name_w = vms
        .iter()
        .map(|v| clean(&v.name).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:>7}  {:<name_w$}  {:<5}  {:<36}  SOURCES",
        "PID", "NAME", "ACCEL", "UUID"
    );
    for vm in &vms {
        println!(
            "{:>7}  {:<name_w$}  {:<5}  {:<36}  timer: {}",
            vm.pid,
            clean(&vm.name),
            vm.accel,
            vm.uuid
                .as_deref()
                .map(crate::text::clean)
                .unwrap_or_else(|| "-".into()),
            clean(&vm.sources.timer)
        );
        let pad = 7 + 2 + name_w + 2 + 5 + 2 + 36 + 2;
        println!("{:pad$}read: {}", "", clean(&vm.sources.read));
        println!("{:pad$}write: {}", "", clean(&vm.sources.write));
        println!(
            "{:pad$}timer callbacks: {}",
            "",
            clean(&vm.sources.timer_callbacks)
        );
        for (what, source) in [
            ("vcpu wakeups", &vm.sources.vcpu_wakeups),
            ("kvm exits", &vm.sources.kvm_exits),
        ] {
            println!("{:pad$}{what}: {}", "", clean(source));
        }
        println!("{:pad$}symbols: {}", "", clean(&vm.symbols));
        if let Some(l) = &vm.libvirt {
            let mut line = format!("libvirt domain: {}", clean(&l.name));
            if let Some(n) = &l.nova {
                for (what, v) in [
                    ("nova name", &n.name),
                    ("project", &n.project),
                    ("user", &n.user),
                    ("flavor", &n.flavor),
                ] {
                    if let Some(v) = v {
                        line.push_str(&format!(", {what}: {}", clean(v)));
                    }
                }
            }
            println!("{:pad$}{line}", "");
        }
    }
    println!("{}", capacity_line(vms.len()));
    println!("uprobe links: {}", uprobe_links_line(options.uprobe_links));
    Ok(ExitCode::SUCCESS)
}

/// The uprobe links `record` would make, as `--uprobe-links` and the kernel allow.
fn uprobe_links_line(choice: crate::offer::policy::UprobeLinkChoice) -> String {
    use crate::offer::policy::UprobeLinkChoice;
    let offered = match choice {
        UprobeLinkChoice::PerSite => Err("per-site links asked for (--uprobe-links)".to_string()),
        UprobeLinkChoice::Auto | UprobeLinkChoice::PerBinary | UprobeLinkChoice::PerVm => {
            crate::probes::kernel::uprobe_multi::offered()
        }
    };
    match (offered, choice) {
        (Err(why), _) => format!("one per probe site: {}", clean(&why)),
        (Ok(()), UprobeLinkChoice::PerVm) => "one multi-uprobe link per VM and program \
             (detaching a VM waits one grace period per link)"
            .to_string(),
        (Ok(()), UprobeLinkChoice::PerBinary) => "one multi-uprobe link per QEMU binary and \
             program, shared by its VMs (per VM under --max-overhead)"
            .to_string(),
        (Ok(()), _) => "one multi-uprobe link per QEMU binary and program, shared by its VMs \
             (per VM with --vm/--pid or --max-overhead)"
            .to_string(),
    }
}

/// What the kernel maps hold, and whether this host's QEMUs fit.
fn capacity_line(vms: usize) -> String {
    let sized = profiler_common::SIZED_FOR_VMS as usize;
    let fit = if vms > sized {
        format!(
            "{vms} QEMU processes exceed that: some updates will be dropped (counted in records' \
             dropped_updates); select fewer with --vm/--pid"
        )
    } else {
        "updates a full map refuses are counted, never lost silently".to_string()
    };
    format!("probe maps sized for {sized} VMs; {fit}")
}
