//! Resolving the names attribution needs, per VM: the QOM type of each region's owner (read
//! from QEMU's memory), timer callback names (from its symbols), and the memory map that names
//! KVM ports and pages (QEMU's `info mtree -f` over QMP, fetched once in the background).
//!
//! Everything here is cached per VM and resolved once per region / callback; what goes wrong
//! comes back as [`Note`]s for the command to show, never printed.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::FileExt as _,
    sync::{Arc, Mutex},
};

use crate::{
    attribution::{RawCounters, VmNames},
    identity::{cmdline::QmpEndpoint, mtree::MtreeMap},
    note::Note,
    offer::symbols::OwnerLayout,
    probes::NameSources,
};

/// Reads the QOM type name of the device owning `region` through QEMU's memory; `None` for
/// regions without an owner (system containers) or when any hop cannot be read.
pub fn region_owner(mem: &File, region: u64, layout: &OwnerLayout) -> Option<String> {
    let read_u64 = |addr: u64| -> Option<u64> {
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_ne_bytes(buf)).filter(|&v| v != 0)
    };
    let owner = read_u64(region.checked_add(layout.region_owner)?)?;
    let class = read_u64(owner.checked_add(layout.object_class)?)?;
    let ty = read_u64(class.checked_add(layout.class_type)?)?;
    let name_ptr = read_u64(ty.checked_add(layout.type_name)?)?;
    let mut buf = [0u8; 64];
    let n = mem.read_at(&mut buf, name_ptr).ok()?;
    let end = buf[..n].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&buf[..end]).into_owned()).filter(|s| !s.is_empty())
}

/// The memory map of a VM, fetched once in the background so a slow, busy or broken monitor
/// never stalls sampling.
#[derive(Debug, Clone)]
enum AddressMap {
    Pending,
    Ready(Arc<MtreeMap>),
    Failed(String),
}

/// Names of one VM, resolved as its counters show new regions and callbacks.
#[derive(Debug)]
pub struct VmNameCache {
    pid: u32,
    vm_name: String,
    /// Its devices (command line, libvirt), for well-known port names.
    devices: Vec<String>,
    libvirt: Option<crate::identity::libvirt::LibvirtDomain>,
    sources: NameSources,
    owners: HashMap<u64, String>,
    owners_tried: HashSet<u64>,
    callbacks: HashMap<u64, String>,
    address_map: Option<Arc<Mutex<AddressMap>>>,
    /// The address map's failure was reported.
    address_map_noted: bool,
    /// `/proc/PID/mem`, kept open while regions are being resolved.
    mem: Option<File>,
}

impl VmNameCache {
    /// Starts resolving names for `vm` (with its QMP endpoint, if any). Notes say what
    /// cannot be named. With `libvirt_monitor`, a libvirt domain whose QMP socket libvirt
    /// holds has its memory map asked of libvirt instead.
    pub fn for_vm(
        vm: &crate::identity::discovery::QemuProcess,
        sources: NameSources,
        libvirt_monitor: bool,
    ) -> (Self, Vec<Note>) {
        let through_libvirt = libvirt_monitor
            && sources.address_map
            && vm.cmdline.qmp.is_empty()
            && vm.identity.libvirt.is_some();
        let mut notes = Vec::new();
        let (mut cache, more) = if through_libvirt {
            let domain = vm.identity.libvirt.as_ref().expect("checked").name.clone();
            notes.push(Note::vm(
                &vm.identity.name,
                format!(
                    "asking libvirt for QEMU's memory map (`virsh qemu-monitor-command {} --hmp \
                     'info mtree -f'`, read-only); libvirt marks the domain tainted \
                     (custom-monitor)",
                    crate::text::clean(&domain)
                ),
            ));
            let no_qmp_fetch = NameSources {
                address_map: false,
                ..sources
            };
            let (mut cache, more) = Self::new(vm.key.pid, &vm.identity.name, no_qmp_fetch, None);
            cache.address_map = Some(fetch_address_map_from_libvirt(domain));
            (cache, more)
        } else {
            Self::new(
                vm.key.pid,
                &vm.identity.name,
                sources,
                vm.cmdline.qmp.first(),
            )
        };
        notes.extend(more);
        cache.devices = vm.identity.devices.clone();
        cache.libvirt = vm.identity.libvirt.clone();
        (cache, notes)
    }

    /// Starts resolving names for VM `vm_name` (process `pid`); `qmp` is the QMP endpoint
    /// on its command line, if any. Notes say what cannot be named.
    pub fn new(
        pid: u32,
        vm_name: &str,
        sources: NameSources,
        qmp: Option<&QmpEndpoint>,
    ) -> (Self, Vec<Note>) {
        let mut notes = Vec::new();
        let address_map = if sources.address_map {
            match qmp {
                Some(endpoint) => match trusted_endpoint(pid, endpoint) {
                    Ok(()) => Some(fetch_address_map(endpoint.clone())),
                    Err(why) => {
                        notes.push(Note::vm(
                            vm_name,
                            format!(
                                "not connecting to the QMP socket on its command line ({why}); \
                                 KVM ports are named from the well-known PC ports"
                            ),
                        ));
                        None
                    }
                },
                None => {
                    notes.push(Note::vm(
                        vm_name,
                        "no QMP socket on its command line; KVM ports are named from the \
                         well-known PC ports of its devices, the rest by address",
                    ));
                    None
                }
            }
        } else {
            None
        };
        let cache = Self {
            pid,
            vm_name: vm_name.to_string(),
            devices: Vec::new(),
            libvirt: None,
            sources,
            owners: HashMap::new(),
            owners_tried: HashSet::new(),
            callbacks: HashMap::new(),
            address_map,
            address_map_noted: false,
            mem: None,
        };
        (cache, notes)
    }

    /// Resolves whatever `raw` shows that is not named yet; returns notes (once each).
    pub fn update(&mut self, raw: &RawCounters) -> Vec<Note> {
        if let Some(layout) = self.sources.owner_layout {
            let new: Vec<u64> = raw
                .region_ids()
                .filter(|id| !self.owners_tried.contains(id))
                .collect();
            for region in new {
                self.owners_tried.insert(region);
                if self.mem.is_none() {
                    self.mem = File::open(format!("/proc/{}/mem", self.pid)).ok();
                }
                if let Some(owner) = self
                    .mem
                    .as_ref()
                    .and_then(|m| region_owner(m, region, &layout))
                {
                    self.owners.insert(region, owner);
                }
            }
        }
        if let Some(namer) = &self.sources.callbacks {
            for id in raw.callback_ids() {
                self.callbacks
                    .entry(id)
                    .or_insert_with(|| namer.callback_name(id));
            }
        }
        let mut notes = Vec::new();
        if !self.address_map_noted
            && let Some(AddressMap::Failed(why)) = self.address_map_state()
        {
            self.address_map_noted = true;
            notes.push(Note::vm(
                &self.vm_name,
                format!(
                    "device names from QMP failed ({why}); KVM ports and pages are named by \
                     address"
                ),
            ));
        }
        notes
    }

    fn address_map_state(&self) -> Option<AddressMap> {
        Some(self.address_map.as_ref()?.lock().ok()?.clone())
    }

    /// The names resolved so far, for [`crate::attribution::attribute`].
    pub fn names(&self) -> ResolvedNames<'_> {
        let map = match self.address_map_state() {
            Some(AddressMap::Ready(map)) => Some(map),
            _ => None,
        };
        ResolvedNames { cache: self, map }
    }
}

/// A borrow of a [`VmNameCache`] with its memory map taken out of the lock.
pub struct ResolvedNames<'a> {
    cache: &'a VmNameCache,
    map: Option<Arc<MtreeMap>>,
}

impl ResolvedNames<'_> {
    pub fn as_names(&self) -> VmNames<'_> {
        VmNames {
            owners: Some(&self.cache.owners),
            callbacks: Some(&self.cache.callbacks),
            address_map: self.map.as_deref(),
            exit_reasons: self.cache.sources.exit_reasons.as_deref(),
            devices: crate::identity::ports::VmDevices {
                cmdline: &self.cache.devices,
                libvirt: self.cache.libvirt.as_ref(),
            },
        }
    }
}

fn fetch_address_map(endpoint: QmpEndpoint) -> Arc<Mutex<AddressMap>> {
    let slot = Arc::new(Mutex::new(AddressMap::Pending));
    let out = slot.clone();
    std::thread::spawn(move || {
        let state = match crate::identity::qmp::device_names(
            &endpoint,
            crate::identity::qmp::DEFAULT_TIMEOUT,
        ) {
            Ok(map) => AddressMap::Ready(Arc::new(map)),
            Err(e) => AddressMap::Failed(format!("{e:#}")),
        };
        if let Ok(mut slot) = out.lock() {
            *slot = state;
        }
    });
    slot
}

/// Whether the profiler (root) may connect to the QMP endpoint a VM's command line names.
/// Whoever starts a QEMU chooses that path: a Unix socket must be a socket owned by the QEMU
/// process's user (so a command line cannot point root's client at another service's socket),
/// a TCP endpoint must be on loopback.
fn trusted_endpoint(pid: u32, endpoint: &QmpEndpoint) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    match endpoint {
        QmpEndpoint::Unix(path) => {
            let owner = std::fs::metadata(format!("/proc/{pid}"))
                .map_err(|e| format!("process gone: {e}"))?
                .uid();
            let meta = std::fs::symlink_metadata(path)
                .map_err(|e| format!("{}: {e}", crate::text::clean(path)))?;
            if !meta.file_type().is_socket() {
                return Err(format!("{} is not a socket", crate::text::clean(path)));
            }
            if meta.uid() != owner {
                return Err(format!(
                    "{} belongs to uid {}, QEMU runs as uid {owner}",
                    crate::text::clean(path),
                    meta.uid()
                ));
            }
            Ok(())
        }
        QmpEndpoint::Tcp { host, .. } => {
            let loopback = host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "{} is not a loopback address",
                    crate::text::clean(host)
                ))
            }
        }
    }
}

/// How long `virsh qemu-monitor-command` may take before it is given up.
const VIRSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The memory map of libvirt domain `domain`, asked of libvirt (which holds QEMU's monitor)
/// with the read-only `info mtree -f`, in the background.
fn fetch_address_map_from_libvirt(domain: String) -> Arc<Mutex<AddressMap>> {
    let slot = Arc::new(Mutex::new(AddressMap::Pending));
    let out = slot.clone();
    std::thread::spawn(move || {
        let state = match virsh_info_mtree(&domain) {
            Ok(text) => {
                let map = crate::identity::mtree::parse_mtree_flat(&text);
                if map.is_empty() {
                    AddressMap::Failed("libvirt returned no memory map".into())
                } else {
                    AddressMap::Ready(Arc::new(map))
                }
            }
            Err(e) => AddressMap::Failed(e),
        };
        if let Ok(mut slot) = out.lock() {
            *slot = state;
        }
    });
    slot
}

fn virsh_info_mtree(domain: &str) -> Result<String, String> {
    use std::{io::Read as _, process::Stdio};
    let mut child = std::process::Command::new("virsh")
        .args([
            "-c",
            "qemu:///system",
            "qemu-monitor-command",
            domain,
            "--hmp",
        ])
        .arg("info mtree -f")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running virsh: {e}"))?;
    let deadline = std::time::Instant::now() + VIRSH_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("virsh did not answer within {VIRSH_TIMEOUT:?}"));
            }
        }
    };
    let mut text = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(format!("virsh: {}", err.trim()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{attribution::RegionLabel, offer::symbols::CallbackNamer};

    #[derive(Debug)]
    struct Names;
    impl CallbackNamer for Names {
        fn callback_name(&self, vaddr: u64) -> String {
            format!("cb_{vaddr:x}")
        }
    }

    #[test]
    fn callbacks_are_named_once_and_a_kvm_vm_without_qmp_is_noted() {
        let sources = NameSources {
            callbacks: Some(Arc::new(Names)),
            owner_layout: None,
            address_map: true,
            exit_reasons: None,
        };
        let (mut cache, notes) = VmNameCache::new(42, "web01", sources, None);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            notes[0].to_string(),
            "VM web01: no QMP socket on its command line; KVM ports are named from the \
             well-known PC ports of its devices, the rest by address"
        );
        let raw = RawCounters {
            by_key: [((profiler_common::kind::TIMER_CALLBACK, 0xabc), 5)].into(),
            regions: [(1, RegionLabel::Unnamed)].into(),
        };
        assert!(cache.update(&raw).is_empty());
        let resolved = cache.names();
        let names = resolved.as_names();
        assert_eq!(names.callbacks.unwrap()[&0xabc], "cb_abc");
        assert!(names.address_map.is_none());
    }

    #[test]
    fn qmp_endpoints_root_may_connect_to() {
        let me = std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let unix = |p: &std::path::Path| QmpEndpoint::Unix(p.display().to_string());
        assert_eq!(trusted_endpoint(me, &unix(&sock)), Ok(()));
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        assert!(
            trusted_endpoint(me, &unix(&file))
                .unwrap_err()
                .contains("not a socket")
        );
        assert!(trusted_endpoint(me, &unix(&dir.path().join("none"))).is_err());
        // Someone else's socket (here: one owned by nobody) is refused.
        // SAFETY: chown on a path we created.
        let c = std::ffi::CString::new(sock.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            let err = trusted_endpoint(me, &unix(&sock)).unwrap_err();
            crate::testing::assert_contains(&err, "belongs to uid 65534");
        }
        let tcp = |host: &str| QmpEndpoint::Tcp {
            host: host.into(),
            port: 4444,
        };
        assert!(trusted_endpoint(me, &tcp("127.0.0.1")).is_ok());
        assert!(trusted_endpoint(me, &tcp("localhost")).is_ok());
        assert!(trusted_endpoint(me, &tcp("[::1]")).is_ok());
        assert!(trusted_endpoint(me, &tcp("10.0.0.5")).is_err());
    }

    #[test]
    fn a_failing_monitor_is_noted_once() {
        let dir = tempfile::tempdir().unwrap();
        // A socket of ours that hangs up on every client: not a QMP monitor.
        let path = dir.path().join("hangup.qmp");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || listener.incoming().for_each(drop));
        let endpoint = QmpEndpoint::Unix(path.display().to_string());
        let sources = NameSources {
            address_map: true,
            ..NameSources::default()
        };
        let (mut cache, notes) =
            VmNameCache::new(std::process::id(), "db", sources, Some(&endpoint));
        assert!(notes.is_empty());
        let raw = RawCounters::default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let note = loop {
            let notes = cache.update(&raw);
            if let Some(n) = notes.into_iter().next() {
                break n;
            }
            assert!(std::time::Instant::now() < deadline, "no note");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(
            note.text.starts_with("device names from QMP failed"),
            "{note}"
        );
        assert!(cache.update(&raw).is_empty());
    }
}
