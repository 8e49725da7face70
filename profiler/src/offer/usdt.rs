//! What a QEMU binary's USDT notes offer: the `qemu:memory_region_ops_read/_write` sites
//! (QEMU built with the dtrace trace backend) and, for each, the argument layout the eBPF
//! side fetches (libbpf's `usdt.c` spec, computed here from the note's operands).

use anyhow::{Context as _, bail};
use profiler_common::{USDT_MAX_ARGS, UsdtArgSpec, UsdtSpec, usdt_arg};

use crate::offer::elf::usdt::{UsdtArg, UsdtArgLocation, UsdtProbe, parse_usdt_probes};

pub const PROVIDER: &str = "qemu";
pub const READ_PROBE: &str = "memory_region_ops_read";
pub const WRITE_PROBE: &str = "memory_region_ops_write";
/// `(int cpu_index, void *mr, u64 addr, u64 value, unsigned size, const char *name)`.
const REGION_ARG: u32 = 1;
const NAME_ARG: u32 = 5;

/// The read/write probe sites of one QEMU executable.
#[derive(Debug, Clone)]
pub struct RegionOpsSites {
    pub read: Vec<UsdtProbe>,
    pub write: Vec<UsdtProbe>,
}

/// Finds the memory_region_ops sites in a QEMU binary; `Ok(None)` when it has none.
pub fn find_region_ops_sites(elf_bytes: &[u8]) -> anyhow::Result<Option<RegionOpsSites>> {
    let probes = parse_usdt_probes(elf_bytes)?;
    let pick = |name: &str| -> Vec<UsdtProbe> {
        probes
            .iter()
            .filter(|p| p.provider == PROVIDER && p.name == name)
            .cloned()
            .collect()
    };
    let (read, write) = (pick(READ_PROBE), pick(WRITE_PROBE));
    if read.is_empty() || write.is_empty() {
        return Ok(None);
    }
    Ok(Some(RegionOpsSites { read, write }))
}

/// Resolves a RIP-relative operand (`symbol+offset`) to its runtime address.
pub type RipResolver<'a> = dyn Fn(&str, i64) -> anyhow::Result<u64> + 'a;

/// Turns a parsed USDT argument into the eBPF side's fetch instructions. RIP-relative operands
/// (`8@seq_iter.6(%rip)`) are resolved here, in userspace, to an absolute runtime address the
/// eBPF side reads; indexed operands (`(%rax,%rbx,8)`) are refused.
pub fn arg_spec(arg: &UsdtArg, rip: &RipResolver<'_>) -> anyhow::Result<UsdtArgSpec> {
    let bitshift = 64 - 8 * u8::min(arg.size, 8);
    let base = UsdtArgSpec {
        signed: arg.signed as u8,
        bitshift,
        ..UsdtArgSpec::default()
    };
    Ok(match &arg.location {
        UsdtArgLocation::Register { reg } => UsdtArgSpec {
            arg_type: usdt_arg::REG,
            reg_off: reg.pt_regs_offset() as u16,
            ..base
        },
        UsdtArgLocation::Memory { base: reg, offset } => UsdtArgSpec {
            arg_type: usdt_arg::REG_DEREF,
            reg_off: reg.pt_regs_offset() as u16,
            val_off: *offset as u64,
            ..base
        },
        UsdtArgLocation::Constant(v) => UsdtArgSpec {
            arg_type: usdt_arg::CONST,
            val_off: *v as u64,
            ..base
        },
        UsdtArgLocation::RipRelative { symbol, offset } => UsdtArgSpec {
            arg_type: usdt_arg::ABS_DEREF,
            val_off: rip(symbol, *offset)?,
            ..base
        },
        other => bail!("USDT operand {other:?} is not supported"),
    })
}

/// The eBPF-side spec of one probe site.
pub fn site_spec(
    site: &UsdtProbe,
    counter_kind: u32,
    rip: &RipResolver<'_>,
) -> anyhow::Result<UsdtSpec> {
    let args = site.parsed_args()?;
    if args.len() <= NAME_ARG as usize || args.len() > USDT_MAX_ARGS {
        bail!(
            "{}:{} has {} arguments ({}), expected 6",
            site.provider,
            site.name,
            args.len(),
            site.raw_args
        );
    }
    let mut spec = UsdtSpec {
        args: [UsdtArgSpec::default(); USDT_MAX_ARGS],
        arg_count: args.len() as u32,
        kind: counter_kind,
        region_arg: REGION_ARG,
        name_arg: NAME_ARG,
    };
    for i in [REGION_ARG as usize, NAME_ARG as usize] {
        spec.args[i] = arg_spec(&args[i], rip)
            .with_context(|| format!("argument {i} of {}:{}", site.provider, site.name))?;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use profiler_common::kind;

    use super::*;
    use crate::offer::elf::usdt::parse_args;

    #[test]
    fn specs_for_qemu_memory_region_ops() {
        // The argument spec of QEMU 7.2's memory_region_ops_read (Debian source, dtrace).
        let args = parse_args("-4@%edi 8@%rsi 8@%rdx 8@%rcx 4@%r8d 8@%r9").unwrap();
        let no_rip = |_: &str, _: i64| -> anyhow::Result<u64> { anyhow::bail!("no symbols") };
        let mr = arg_spec(&args[1], &no_rip).unwrap();
        assert_eq!(mr.arg_type, usdt_arg::REG);
        assert_eq!(mr.reg_off, 104); // rsi in struct pt_regs
        assert_eq!(mr.bitshift, 0);
        let name = arg_spec(&args[5], &no_rip).unwrap();
        assert_eq!(name.reg_off, 64); // r9
        let cpu = arg_spec(&args[0], &no_rip).unwrap();
        assert_eq!((cpu.signed, cpu.bitshift, cpu.reg_off), (1, 32, 112)); // edi
        let deref = arg_spec(&parse_args("-4@-20(%rbp)").unwrap()[0], &no_rip).unwrap();
        assert_eq!(deref.arg_type, usdt_arg::REG_DEREF);
        assert_eq!(deref.val_off as i64, -20);
        let constant = arg_spec(&parse_args("4@$7").unwrap()[0], &no_rip).unwrap();
        assert_eq!((constant.arg_type, constant.val_off), (usdt_arg::CONST, 7));
        let rip = parse_args("8@seq_iter.6+8(%rip)").unwrap();
        assert!(arg_spec(&rip[0], &no_rip).is_err());
        // Resolved in userspace to symbol + offset + load bias; the eBPF side reads it.
        let resolve = |sym: &str, off: i64| -> anyhow::Result<u64> {
            assert_eq!(sym, "seq_iter.6");
            Ok((0x55d0_0000_0000u64 + 0xe4b000).wrapping_add(off as u64))
        };
        let abs = arg_spec(&rip[0], &resolve).unwrap();
        assert_eq!(abs.arg_type, usdt_arg::ABS_DEREF);
        assert_eq!(abs.val_off, 0x55d0_00e4_b008);
        assert!(arg_spec(&parse_args("8@(%rax,%rbx,8)").unwrap()[0], &resolve).is_err());
    }

    #[test]
    fn qemu_with_usdt_has_one_site_each() {
        let Some(path) = xtask::prereq::Prereq::new("qemu_with_usdt_has_one_site_each").usdt_qemu()
        else {
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let sites = find_region_ops_sites(&bytes)
            .unwrap()
            .expect("probes present");
        assert_eq!((sites.read.len(), sites.write.len()), (1, 1));
        let no_rip = |_: &str, _: i64| -> anyhow::Result<u64> { anyhow::bail!("no symbols") };
        for site in sites.read.iter().chain(&sites.write) {
            site_spec(site, kind::READ, &no_rip).unwrap();
            assert!(site.semaphore.is_some());
        }
    }
}
