//! What the kernel offers the KVM sources: the field layout of the kvm tracepoints the access
//! state machine reads (`kvm_pio`, `kvm_mmio`, `kvm_fast_mmio`, `kvm_userspace_exit`), the
//! vCPU wakeups (`kvm_vcpu_wakeup`), the VM exits by reason (`kvm_exit`, with the names of its
//! reasons from its own `format` file), and whether this host's KVM fires them at all.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail};
use profiler_common::kvm::{KvmField, KvmFieldOffsets};

use super::tracefs::{TracepointFormat, parse_format};

/// True when this host can run KVM guests at all (`/dev/kvm` exists). Without it the
/// tracepoints may still exist and attach, but never fire.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
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
    // The wakeup and exit counts are optional: their fields stay empty (size 0, read as
    // nothing) where the kernel lacks them, and [`KvmOffer`] says why.
    let optional = |event: &str, name: &str| {
        read_format(tracefs, event)
            .and_then(|f| kvm_field(&f, event, name))
            .unwrap_or_default()
    };
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
        wakeup_waited: optional("kvm_vcpu_wakeup", "waited"),
        vm_exit_reason: optional("kvm_exit", "exit_reason"),
        vm_exit_isa: optional("kvm_exit", "isa"),
    })
}

/// Whether the KVM tracepoints can be used on this host, as the kvm source's attach would
/// find them: the four tracepoints of the access state machine exist with the fields the
/// programs read. For `profiler list`, which attaches nothing.
pub fn kvm_offered(tracefs: &Path) -> Result<(), String> {
    field_offsets(tracefs)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// What the kernel offers a KVM guest's own counts, besides its device accesses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmOffer {
    /// `kvm:kvm_vcpu_wakeup` with its `waited` field: vCPU wakeups and halt polls.
    pub vcpu_wakeups: Result<(), String>,
    /// `kvm:kvm_exit`, fired by this host's KVM: VM exits by reason.
    pub exits: Result<(), String>,
}

impl KvmOffer {
    /// This host's: tracefs at `tracefs`, the loaded modules under `sys_module`
    /// (`/sys/module`).
    pub fn of_host(tracefs: &Path, sys_module: &Path) -> Self {
        let field = |event: &str, name: &str| {
            read_format(tracefs, event)
                .and_then(|f| kvm_field(&f, event, name))
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        };
        let exits = field("kvm_exit", "exit_reason")
            .and_then(|()| field("kvm_exit", "isa"))
            .and_then(|()| exits_fired(&loaded_kvm_modules(sys_module)));
        Self {
            vcpu_wakeups: field("kvm_vcpu_wakeup", "waited"),
            exits,
        }
    }
}

/// The KVM implementations among the kernel modules loaded (`kvm_intel`, `kvm_amd`,
/// `kvm_pvm`): a directory of that name under `sys_module`.
pub fn loaded_kvm_modules(sys_module: &Path) -> Vec<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| sys_module.join(m).is_dir())
        .map(String::from)
        .collect()
}

/// Whether a KVM made of `modules` fires `kvm_exit`: VMX (`kvm_intel`) and SVM (`kvm_amd`)
/// trace every exit; PVM (`kvm_pvm`, a paravirtualized KVM for guests in a VM) does not.
pub fn exits_fired(modules: &[String]) -> Result<(), String> {
    if modules.iter().any(|m| m == "kvm_intel" || m == "kvm_amd") {
        return Ok(());
    }
    if modules.iter().any(|m| m == "kvm_pvm") {
        return Err(
            "this host's KVM is PVM (the kvm_pvm module), which does not fire kvm:kvm_exit".into(),
        );
    }
    Err("no KVM implementation module (kvm_intel, kvm_amd) is loaded".into())
}

/// The names of VM exit reasons, as `kvm:kvm_exit`'s own `format` file prints them: VMX's
/// (`isa` 1) and SVM's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitReasonNames {
    pub vmx: BTreeMap<u64, String>,
    pub svm: BTreeMap<u64, String>,
}

/// `kvm_exit`'s `isa` for VMX, SVM.
pub const ISA_VMX: u32 = 1;
pub const ISA_SVM: u32 = 2;

impl ExitReasonNames {
    /// From the `print fmt:` line of a `kvm_exit` format file: its two `__print_symbolic`
    /// tables, VMX's first. Missing or garbled tables give no names (reasons then print as
    /// numbers), never an error.
    pub fn from_format(text: &str) -> Self {
        let Some(fmt) = text.lines().find_map(|l| l.strip_prefix("print fmt:")) else {
            return Self::default();
        };
        let mut tables = fmt.split("__print_symbolic(").skip(1).map(symbolic_table);
        Self {
            vmx: tables.next().unwrap_or_default(),
            svm: tables.next().unwrap_or_default(),
        }
    }

    /// This host's, from tracefs.
    pub fn of_host(tracefs: &Path) -> Self {
        std::fs::read_to_string(tracefs.join("events/kvm/kvm_exit/format"))
            .map(|t| Self::from_format(&t))
            .unwrap_or_default()
    }

    /// The name of exit `reason` under instruction set `isa` (VMX's basic reason is its low
    /// 16 bits), else `isa:reason` in hex.
    pub fn name(&self, isa: u32, reason: u32) -> String {
        let (table, key) = match isa {
            ISA_VMX => (&self.vmx, u64::from(reason & 0xffff)),
            ISA_SVM => (&self.svm, u64::from(reason)),
            _ => return format!("isa{isa}:{reason:#x}"),
        };
        table.get(&key).cloned().unwrap_or_else(|| {
            let set = if isa == ISA_VMX { "vmx" } else { "svm" };
            format!("{set}:{reason:#x}")
        })
    }
}

/// `{ 0, "EXCEPTION_NMI" }, { 0x040 + 1, "DB excp" }, ...` up to the table's closing `})`.
fn symbolic_table(text: &str) -> BTreeMap<u64, String> {
    let end = text
        .match_indices('}')
        .map(|(i, _)| i)
        .find(|&i| text[i + 1..].trim_start().starts_with(')'))
        .unwrap_or(text.len());
    text[..end]
        .split('{')
        .skip(1)
        .filter_map(|pair| {
            let (value, name) = pair.split('}').next()?.split_once(',')?;
            Some((
                eval_sum(value.trim())?,
                name.trim().trim_matches('"').to_string(),
            ))
        })
        .collect()
}

/// `0x040 + 13`, `12`, `-1`: a sum of decimal or hex terms (negative: as a u32).
fn eval_sum(expr: &str) -> Option<u64> {
    let mut total: i64 = 0;
    for term in expr.split('+') {
        let term = term.trim();
        let (neg, digits) = match term.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, term),
        };
        let v = match digits.strip_prefix("0x") {
            Some(hex) => i64::from_str_radix(hex, 16).ok()?,
            None => digits.parse::<i64>().ok()?,
        };
        total += if neg { -v } else { v };
    }
    Some(u64::from(total as u32))
}

#[cfg(test)]
mod tests;
