//! What the kernel offers the probes, found without loading or attaching anything: its
//! tracepoints' field layouts (tracefs `format` files are not ABI, so what the programs read
//! is checked against them), whether the hrtimer tracepoints and the kvm tracepoints can serve,
//! and the kernel facts they need. `profiler list` and the probe layer ask here, and the source
//! policy takes the answers as inputs ([`KernelOffer`]).

use std::path::Path;

use anyhow::{Context as _, bail};

use super::{
    kvm::{KvmOffer, kvm_offered},
    tracefs::parse_format,
};

/// What this kernel offers the sources the policy chooses between (`Err`: why not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelOffer {
    /// The hrtimer tracepoints (`timer:hrtimer_*`, and `sched_switch` as a raw tracepoint):
    /// the hrtimer timer source.
    pub hrtimer: Result<(), String>,
    /// `timer:hrtimer_start` alone, which tells a `ppoll`'s timeout from a zero one for the
    /// libc result probes.
    pub hrtimer_start: Result<(), String>,
    /// The kvm tracepoints (`kvm:kvm_pio`, `kvm_mmio`, `kvm_fast_mmio`, `kvm_userspace_exit`).
    pub kvm: Result<(), String>,
    /// A KVM guest's own counts: vCPU wakeups and VM exits by reason.
    pub guest: KvmOffer,
}

impl KernelOffer {
    /// Everything offered (tests of the policy).
    pub fn all() -> Self {
        Self {
            hrtimer: Ok(()),
            hrtimer_start: Ok(()),
            kvm: Ok(()),
            guest: KvmOffer {
                vcpu_wakeups: Ok(()),
                exits: Ok(()),
            },
        }
    }

    /// This host's offer, read from tracefs (mounted at `tracefs`), `/proc/kallsyms` and the
    /// kernel's release.
    pub fn of_host(tracefs: &Path) -> Self {
        Self {
            hrtimer: hrtimer_offered_here(tracefs).map(drop),
            hrtimer_start: hrtimer_start_offered_here(tracefs).map(drop),
            kvm: kvm_offered(tracefs),
            guest: KvmOffer::of_host(tracefs, Path::new("/sys/module")),
        }
    }
}

/// The kernel release whose raw `sched_switch` arguments include `prev_state`, which the
/// hrtimer source's program reads (an older kernel refuses its attach).
pub const HRTIMER_MIN_RELEASE: (u32, u32) = (5, 18);

/// `(major, minor)` of a kernel release (`6.18.44-fc-v1300`).
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `timer:hrtimer_start` can mark the sleep timers of a kernel whose tracefs is at
/// `tracefs` and whose `/proc/kallsyms` reads `kallsyms`: its field layout, and the address of
/// `hrtimer_wakeup` (the function of a sleep timer), which is returned.
pub fn hrtimer_start_offered(tracefs: &Path, kallsyms: &str) -> Result<u64, String> {
    check_layout(tracefs, &HRTIMER_START_LAYOUT).map_err(|e| format!("{e:#}"))?;
    kallsyms_address(kallsyms, "hrtimer_wakeup").ok_or_else(|| {
        "hrtimer_wakeup has no address in /proc/kallsyms (kernel.kptr_restrict hides it)".into()
    })
}

/// Whether the hrtimer source can serve on a kernel of `release` as well: what
/// [`hrtimer_start_offered`] checks, the rest of the layout its programs read, and the release
/// (its `sched_switch` program reads `prev_state`). Returns `hrtimer_wakeup`'s address.
pub fn hrtimer_offered(tracefs: &Path, kallsyms: &str, release: &str) -> Result<u64, String> {
    match release_version(release) {
        Some(v) if v >= HRTIMER_MIN_RELEASE => {}
        Some((major, minor)) => {
            return Err(format!(
                "Linux {major}.{minor} has no `prev_state` among sched_switch's raw arguments \
                 ({}.{} or later does)",
                HRTIMER_MIN_RELEASE.0, HRTIMER_MIN_RELEASE.1
            ));
        }
        None => return Err(format!("cannot read the kernel release {release:?}")),
    }
    check_layout(tracefs, &HRTIMER_CANCEL_LAYOUT).map_err(|e| format!("{e:#}"))?;
    hrtimer_start_offered(tracefs, kallsyms)
}

fn kallsyms_here() -> Result<String, String> {
    std::fs::read_to_string("/proc/kallsyms").map_err(|e| format!("reading /proc/kallsyms: {e}"))
}

/// [`hrtimer_start_offered`] on this host.
pub fn hrtimer_start_offered_here(tracefs: &Path) -> Result<u64, String> {
    hrtimer_start_offered(tracefs, &kallsyms_here()?)
}

/// [`hrtimer_offered`] on this host.
pub fn hrtimer_offered_here(tracefs: &Path) -> Result<u64, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("reading /proc/sys/kernel/osrelease: {e}"))?;
    hrtimer_offered(tracefs, &kallsyms_here()?, &release)
}

/// A tracepoint field a program reads: (category, event, field, offset, size).
type FieldAt = (&'static str, &'static str, &'static str, usize, usize);

/// What the `hrtimer_start` program reads.
const HRTIMER_START_LAYOUT: [FieldAt; 2] = [
    ("timer", "hrtimer_start", "hrtimer", 8, 8),
    ("timer", "hrtimer_start", "function", 16, 8),
];
/// What the `hrtimer_cancel` program reads.
const HRTIMER_CANCEL_LAYOUT: [FieldAt; 1] = [("timer", "hrtimer_cancel", "hrtimer", 8, 8)];
/// The address of `name` in a `/proc/kallsyms` text; `None` when absent or hidden (all zeros
/// when `kptr_restrict` hides addresses from this reader).
pub fn kallsyms_address(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let addr = fields.next()?;
        let _kind = fields.next()?;
        (fields.next()? == name && fields.next().is_none())
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

/// Checks the field layout of the tracepoints against what the programs read.
fn check_layout(tracefs: &Path, layout: &[FieldAt]) -> anyhow::Result<()> {
    for &(category, event, field, offset, size) in layout {
        let path = tracefs
            .join("events")
            .join(category)
            .join(event)
            .join("format");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("tracepoint {category}:{event}: reading {}", path.display())
        })?;
        let format = parse_format(&text).with_context(|| format!("parsing {}", path.display()))?;
        match format.field(field) {
            Some(f) if f.offset == offset && f.size == size => {}
            Some(f) => bail!(
                "{category}:{event} has `{field}` at offset {} (size {}), the programs read it \
                 at {offset} (size {size})",
                f.offset,
                f.size
            ),
            None => bail!("{category}:{event} has no field `{field}`"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
