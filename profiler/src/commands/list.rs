use std::process::ExitCode;

use serde::Serialize;

use crate::{
    cmdline::QmpEndpoint,
    discovery::{HostPaths, scan_qemu_processes},
    record::Sources,
    report::sanitize,
    session::{probe_offered_sources, sources_with},
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
}

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let procs = scan_qemu_processes(&HostPaths::default());
    // Reading a QEMU binary's notes and symbols costs tens of MB of I/O: once per binary.
    let mut offered_by_exe = std::collections::HashMap::new();
    let vms: Vec<ListedVm> = procs
        .iter()
        .map(|p| {
            let offered = match crate::probes::usdt::exe_inode(p.key.pid) {
                Ok(exe) => offered_by_exe
                    .entry(exe)
                    .or_insert_with(|| probe_offered_sources(p))
                    .clone(),
                Err(_) => probe_offered_sources(p),
            };
            ListedVm {
                name: p.identity.name.clone(),
                pid: p.key.pid,
                uuid: p.identity.uuid.clone(),
                xen_domid: p.identity.xen_domid,
                accel: p.identity.accel.to_string(),
                exe: p.exe.display().to_string(),
                devices: p.cmdline.devices.clone(),
                qmp: p.cmdline.qmp.clone(),
                sources: sources_with(
                    &offered.read_write,
                    offered.callbacks_unavailable.as_deref(),
                ),
                symbols: offered.symbols,
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
        .map(|v| sanitize(&v.name).chars().count())
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
            sanitize(&vm.name),
            vm.accel,
            vm.uuid
                .as_deref()
                .map(sanitize)
                .unwrap_or_else(|| "-".into()),
            sanitize(&vm.sources.timer)
        );
        let pad = 7 + 2 + name_w + 2 + 5 + 2 + 36 + 2;
        println!("{:pad$}read: {}", "", sanitize(&vm.sources.read));
        println!("{:pad$}write: {}", "", sanitize(&vm.sources.write));
        println!(
            "{:pad$}timer callbacks: {}",
            "",
            sanitize(&vm.sources.timer_callbacks)
        );
        println!("{:pad$}symbols: {}", "", sanitize(&vm.symbols));
    }
    Ok(ExitCode::SUCCESS)
}
