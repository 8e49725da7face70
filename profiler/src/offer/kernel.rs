//! What the kernel offers the probes, found without loading or attaching anything: its
//! tracepoints' field layouts (tracefs `format` files are not ABI, so what the programs read
//! is checked against them), whether the hrtimer tracepoints and the kvm tracepoints can serve,
//! and the kernel facts they need. `profiler list` and the probe layer ask here, and the source
//! policy takes the answers as inputs ([`KernelOffer`]).

use std::path::Path;

use anyhow::{Context as _, bail};
use profiler_common::kvm::{KvmField, KvmFieldOffsets};

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
}

impl KernelOffer {
    /// Everything offered (tests of the policy).
    pub fn all() -> Self {
        Self {
            hrtimer: Ok(()),
            hrtimer_start: Ok(()),
            kvm: Ok(()),
        }
    }

    /// This host's offer, read from tracefs (mounted at `tracefs`), `/proc/kallsyms` and the
    /// kernel's release.
    pub fn of_host(tracefs: &Path) -> Self {
        Self {
            hrtimer: hrtimer_offered_here(tracefs).map(drop),
            hrtimer_start: hrtimer_start_offered_here(tracefs).map(drop),
            kvm: kvm_offered(tracefs),
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

/// True when this host can run KVM guests at all (`/dev/kvm` exists). Without it the
/// tracepoints may still exist and attach, but never fire.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// One field of a tracefs event `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    /// The C declaration without the name, e.g. `unsigned int`, `u64`, `__data_loc char[]`.
    pub c_type: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A parsed tracefs `events/<system>/<event>/format` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: Option<String>,
    pub id: Option<u32>,
    /// Common fields first, then the event's own, in file order.
    pub fields: Vec<FormatField>,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

fn parse_field(line_no: usize, line: &str) -> anyhow::Result<FormatField> {
    // `field:unsigned int rw;	offset:8;	size:4;	signed:0;`
    let mut parts = line.split(';').map(str::trim).filter(|p| !p.is_empty());
    let decl = parts
        .next()
        .and_then(|p| p.strip_prefix("field:"))
        .with_context(|| format!("line {line_no}: expected `field:<declaration>;`"))?
        .trim();
    let (c_type, raw_name) = decl
        .rsplit_once(char::is_whitespace)
        .with_context(|| format!("line {line_no}: field declaration `{decl}` has no name"))?;
    // `char comm[16]` names `comm`; `void *ptr` names `ptr`.
    let name = raw_name
        .trim_start_matches('*')
        .split('[')
        .next()
        .unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("line {line_no}: field declaration `{decl}` has no valid name");
    }
    let (mut offset, mut size, mut signed) = (None, None, None);
    for part in parts {
        let (key, value) = part
            .split_once(':')
            .with_context(|| format!("line {line_no}: malformed attribute `{part}` of `{name}`"))?;
        let value: usize = value.trim().parse().with_context(|| {
            format!("line {line_no}: `{key}` of field `{name}` is not a number: `{value}`")
        })?;
        match key.trim() {
            "offset" => offset = Some(value),
            "size" => size = Some(value),
            "signed" => signed = Some(value != 0),
            _ => {} // Attributes a future kernel may add.
        }
    }
    let missing = |what: &str| format!("line {line_no}: field `{name}` has no {what}");
    Ok(FormatField {
        name: name.to_string(),
        c_type: c_type.trim().to_string(),
        offset: offset.with_context(|| missing("offset"))?,
        size: size.with_context(|| missing("size"))?,
        // Kernels before 2.6.32 had no `signed`; nothing here needs them, but be lenient.
        signed: signed.unwrap_or(false),
    })
}

/// Parses a tracefs event `format` file. Errors name the line; a file without the
/// `format:` header, without fields, or cut before its `print fmt:` line is rejected.
pub fn parse_format(text: &str) -> anyhow::Result<TracepointFormat> {
    let mut out = TracepointFormat::default();
    let mut in_format = false;
    let mut complete = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !in_format {
            if let Some(name) = trimmed.strip_prefix("name:") {
                out.name = Some(name.trim().to_string());
            } else if let Some(id) = trimmed.strip_prefix("ID:") {
                out.id = Some(id.trim().parse().with_context(|| {
                    format!("line {line_no}: event ID is not a number: `{}`", id.trim())
                })?);
            } else if trimmed == "format:" {
                in_format = true;
            } else {
                bail!("line {line_no}: not a tracefs format file: unexpected `{trimmed}`");
            }
            continue;
        }
        if trimmed.starts_with("print fmt:") {
            complete = true;
            break;
        }
        if !trimmed.starts_with("field:") {
            bail!("line {line_no}: expected a `field:` line, found `{trimmed}`");
        }
        out.fields.push(parse_field(line_no, trimmed)?);
    }
    if !in_format {
        bail!("not a tracefs format file: no `format:` line");
    }
    if out.fields.is_empty() {
        bail!("the format lists no fields");
    }
    if !complete {
        bail!("truncated format: no `print fmt:` line after the fields");
    }
    Ok(out)
}

fn read_format(tracefs: &Path, event: &str) -> anyhow::Result<TracepointFormat> {
    let path = tracefs.join("events/kvm").join(event).join("format");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "tracepoint kvm:{event} does not exist ({} not found): the kvm module is not \
             loaded (`modprobe kvm`) or the kernel was built without CONFIG_KVM",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_format(&text).with_context(|| format!("parsing {}", path.display()))
}

fn kvm_field(format: &TracepointFormat, event: &str, name: &str) -> anyhow::Result<KvmField> {
    let Some(field) = format.field(name) else {
        let names: Vec<&str> = format.fields.iter().map(|f| f.name.as_str()).collect();
        bail!(
            "tracepoint kvm:{event} has no field `{name}` (it has: {}); this kernel's KVM \
             tracepoints differ from the ones the profiler knows",
            names.join(", ")
        );
    };
    if !matches!(field.size, 1 | 2 | 4 | 8) {
        bail!(
            "field `{name}` of tracepoint kvm:{event} is {} bytes; expected 1, 2, 4 or 8",
            field.size
        );
    }
    let offset = u16::try_from(field.offset)
        .ok()
        .filter(|o| usize::from(*o) + field.size <= usize::from(u16::MAX))
        .with_context(|| {
            format!(
                "field `{name}` of tracepoint kvm:{event} is at offset {}, too far",
                field.offset
            )
        })?;
    Ok(KvmField {
        offset,
        size: field.size as u8,
        signed: u8::from(field.signed),
    })
}

/// Field layout of the four tracepoints from `<tracefs>/events/kvm/*/format`. The error
/// names the missing tracepoint or field.
pub fn field_offsets(tracefs: &Path) -> anyhow::Result<KvmFieldOffsets> {
    let pio = read_format(tracefs, "kvm_pio")?;
    let mmio = read_format(tracefs, "kvm_mmio")?;
    let fast = read_format(tracefs, "kvm_fast_mmio")?;
    let exit = read_format(tracefs, "kvm_userspace_exit")?;
    Ok(KvmFieldOffsets {
        configured: 1,
        pio_rw: kvm_field(&pio, "kvm_pio", "rw")?,
        pio_port: kvm_field(&pio, "kvm_pio", "port")?,
        pio_count: kvm_field(&pio, "kvm_pio", "count")?,
        mmio_type: kvm_field(&mmio, "kvm_mmio", "type")?,
        mmio_gpa: kvm_field(&mmio, "kvm_mmio", "gpa")?,
        fast_mmio_gpa: kvm_field(&fast, "kvm_fast_mmio", "gpa")?,
        exit_reason: kvm_field(&exit, "kvm_userspace_exit", "reason")?,
        exit_errno: kvm_field(&exit, "kvm_userspace_exit", "errno")?,
    })
}

/// Whether the KVM tracepoints can be used on this host, as the kvm source's attach would find them: the
/// four tracepoints exist with the fields the programs read. For `profiler list`, which
/// attaches nothing.
pub fn kvm_offered(tracefs: &Path) -> Result<(), String> {
    field_offsets(tracefs)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests;
