//! USDT (SystemTap SDT) probes: the `.note.stapsdt` notes a `--enable-trace-backends=dtrace`
//! QEMU carries, and the x86_64 argument specs in them (`-4@%edi 8@%rsi 8@seq_iter.6(%rip)`).
//!
//! A probe site is a `nop` at `pc`; a uprobe at `pc_file_offset` fires there. When the probe
//! has a semaphore (QEMU's do), the site is only reached while the 16-bit counter at
//! `semaphore` is non-zero, so the profiler must raise it (through `/proc/PID/mem`, or the
//! kernel's uprobe `ref_ctr_offset` = `semaphore_file_offset`).

use anyhow::{Context, bail};
use object::{Endianness, elf, read::elf::SectionHeader as _};

use super::{
    Elf, parse_notes,
    symbols::{SymbolBinding, SymbolTable},
    with_elf,
};

/// Note type of a SystemTap probe descriptor (`NT_STAPSDT`), owner `"stapsdt"`.
pub const NT_STAPSDT: u32 = 3;
const STAPSDT_OWNER: &[u8] = b"stapsdt";

/// One USDT probe site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// Link-time virtual address of the probe's `nop`, adjusted for `.stapsdt.base`.
    pub pc: u64,
    /// Link-time virtual address of the 16-bit semaphore, adjusted; `None` when unguarded.
    pub semaphore: Option<u64>,
    /// Parsed argument specs; empty when `args_error` is set.
    pub args: Vec<UsdtArg>,
    /// Why `raw_args` could not be parsed. Kept per probe rather than failing the whole
    /// binary: one exotic operand in one of QEMU's ~thousand probes must not hide the rest.
    pub args_error: Option<String>,
    /// The argument spec exactly as in the note.
    pub raw_args: String,
    /// File offset of `pc`: what a uprobe attaches to.
    pub pc_file_offset: u64,
    /// File offset of the semaphore: the uprobe `ref_ctr_offset`.
    pub semaphore_file_offset: Option<u64>,
}

impl UsdtProbe {
    /// The parsed arguments, or the parse error.
    pub fn parsed_args(&self) -> anyhow::Result<&[UsdtArg]> {
        match &self.args_error {
            None => Ok(&self.args),
            Some(e) => bail!(
                "USDT probe {}:{} at {:#x}: cannot parse arguments {:?}: {e}",
                self.provider,
                self.name,
                self.pc,
                self.raw_args
            ),
        }
    }
}

/// Reads every `stapsdt` note of an x86_64 ELF64 file (executable or shared object).
///
/// Returns an empty list when the file has no `.note.stapsdt` section (e.g. a QEMU built
/// with the log trace backend). Malformed notes, and probe addresses that fall outside the
/// file's loadable segments, are errors naming the note.
pub fn parse_usdt_probes(elf_bytes: &[u8]) -> anyhow::Result<Vec<UsdtProbe>> {
    with_elf(elf_bytes, parse_probes_in).context("reading USDT notes")
}

fn parse_probes_in(elf: &Elf<'_>) -> anyhow::Result<Vec<UsdtProbe>> {
    if elf.machine() != elf::EM_X86_64 {
        bail!(
            "USDT probes are only supported in x86_64 binaries; this ELF file is for machine \
             {} (e_machine)",
            elf.machine()
        );
    }
    // Prelink (and anything else that moves a linked object) relocates allocated sections
    // but not the non-allocated notes. The note records where `.stapsdt.base` was at link
    // time; the section's current address gives the shift to apply, as libbpf and
    // systemtap do.
    let base_section = elf.section(".stapsdt.base").map(|s| s.sh_addr(elf.endian));

    let mut probes = Vec::new();
    for section in elf.sections.iter() {
        if section.sh_type(elf.endian) != elf::SHT_NOTE
            || elf.sections.section_name(elf.endian, section) != Ok(b".note.stapsdt")
        {
            continue;
        }
        let data = elf.section_data(".note.stapsdt", section)?;
        let notes = parse_notes(data, section.sh_addralign(elf.endian), elf.endian)
            .context("malformed .note.stapsdt section")?;
        for note in notes {
            if note.name != STAPSDT_OWNER || note.n_type != NT_STAPSDT {
                continue;
            }
            let probe = parse_note(elf, note.desc, base_section).with_context(|| {
                format!(
                    "malformed stapsdt note at .note.stapsdt+{:#x} (probe #{})",
                    note.offset,
                    probes.len()
                )
            })?;
            probes.push(probe);
        }
    }
    Ok(probes)
}

fn parse_note(elf: &Elf<'_>, desc: &[u8], base_section: Option<u64>) -> anyhow::Result<UsdtProbe> {
    // ELF64 layout: pc, base, semaphore (3 × u64), then provider\0 name\0 args\0.
    const ADDRS: usize = 3 * 8;
    if desc.len() < ADDRS + 3 {
        bail!(
            "descriptor is {} bytes, too short for 3 addresses and 3 strings",
            desc.len()
        );
    }
    let word = |i: usize| {
        let b: [u8; 8] = desc[i * 8..i * 8 + 8].try_into().expect("8 bytes");
        match elf.endian {
            Endianness::Little => u64::from_le_bytes(b),
            Endianness::Big => u64::from_be_bytes(b),
        }
    };
    let (note_pc, note_base, note_sema) = (word(0), word(1), word(2));
    // Three NUL-terminated strings; anything after the third NUL is padding.
    let strings = &desc[ADDRS..];
    if strings.iter().filter(|&&b| b == 0).count() < 3 {
        bail!("descriptor strings are not NUL-terminated (provider, name, arguments)");
    }
    let mut strings = strings.split(|&b| b == 0);
    let mut next_string = |what: &str| -> anyhow::Result<String> {
        let bytes = strings.next().unwrap_or_default();
        String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    };
    let provider = next_string("provider")?;
    let name = next_string("probe name")?;
    let raw_args = next_string("argument spec")?;
    if provider.is_empty() || name.is_empty() {
        bail!("empty provider or probe name");
    }
    let what = || format!("probe {provider}:{name}");

    let shift = base_section
        .filter(|_| note_base != 0)
        .map_or(0, |actual| actual.wrapping_sub(note_base));
    let pc = note_pc.wrapping_add(shift);
    let semaphore = (note_sema != 0).then(|| note_sema.wrapping_add(shift));

    let pc_segment = elf
        .segments
        .iter()
        .find(|s| s.file_offset_of(pc).is_some())
        .with_context(|| {
            format!(
                "{}: pc {pc:#x} is not in any file-backed PT_LOAD segment",
                what()
            )
        })?;
    if !pc_segment.is_executable() {
        bail!("{}: pc {pc:#x} is in a non-executable segment", what());
    }
    let pc_file_offset = pc_segment.file_offset_of(pc).expect("checked above");

    let semaphore_file_offset = match semaphore {
        None => None,
        Some(sema) => {
            let segment = elf
                .segments
                .iter()
                .find(|s| s.file_offset_of(sema).is_some())
                .with_context(|| {
                    format!(
                        "{}: semaphore {sema:#x} is not in any file-backed PT_LOAD segment",
                        what()
                    )
                })?;
            // The kernel and the profiler increment the semaphore in the process's memory.
            if !segment.is_writable() {
                bail!("{}: semaphore {sema:#x} is in a read-only segment", what());
            }
            segment.file_offset_of(sema)
        }
    };

    let (args, args_error) = match parse_args(&raw_args) {
        Ok(args) => (args, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    Ok(UsdtProbe {
        provider,
        name,
        pc,
        semaphore,
        args,
        args_error,
        raw_args,
        pc_file_offset,
        semaphore_file_offset,
    })
}

/// An x86_64 general-purpose register (or `rip`), whatever width the spec named it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum X86Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
}

impl X86Reg {
    pub const ALL: [X86Reg; 17] = [
        X86Reg::Rax,
        X86Reg::Rbx,
        X86Reg::Rcx,
        X86Reg::Rdx,
        X86Reg::Rsi,
        X86Reg::Rdi,
        X86Reg::Rbp,
        X86Reg::Rsp,
        X86Reg::R8,
        X86Reg::R9,
        X86Reg::R10,
        X86Reg::R11,
        X86Reg::R12,
        X86Reg::R13,
        X86Reg::R14,
        X86Reg::R15,
        X86Reg::Rip,
    ];

    /// Byte offset of this register in the kernel's x86_64 `struct pt_regs`
    /// (arch/x86/include/asm/ptrace.h; checked against this machine's BTF): r15 r14 r13 r12
    /// bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss, 8 bytes each.
    pub fn pt_regs_offset(self) -> usize {
        match self {
            X86Reg::R15 => 0,
            X86Reg::R14 => 8,
            X86Reg::R13 => 16,
            X86Reg::R12 => 24,
            X86Reg::Rbp => 32,
            X86Reg::Rbx => 40,
            X86Reg::R11 => 48,
            X86Reg::R10 => 56,
            X86Reg::R9 => 64,
            X86Reg::R8 => 72,
            X86Reg::Rax => 80,
            X86Reg::Rcx => 88,
            X86Reg::Rdx => 96,
            X86Reg::Rsi => 104,
            X86Reg::Rdi => 112,
            X86Reg::Rip => 128,
            X86Reg::Rsp => 152,
        }
    }

    /// The 64-bit name (`"rax"`, `"r8"`, `"rip"`).
    pub fn name(self) -> &'static str {
        match self {
            X86Reg::Rax => "rax",
            X86Reg::Rbx => "rbx",
            X86Reg::Rcx => "rcx",
            X86Reg::Rdx => "rdx",
            X86Reg::Rsi => "rsi",
            X86Reg::Rdi => "rdi",
            X86Reg::Rbp => "rbp",
            X86Reg::Rsp => "rsp",
            X86Reg::R8 => "r8",
            X86Reg::R9 => "r9",
            X86Reg::R10 => "r10",
            X86Reg::R11 => "r11",
            X86Reg::R12 => "r12",
            X86Reg::R13 => "r13",
            X86Reg::R14 => "r14",
            X86Reg::R15 => "r15",
            X86Reg::Rip => "rip",
        }
    }

    /// Parses an AT&T register name without `%` into the full register and the width in
    /// bytes that name denotes (`"r8d"` → (R8, 4), `"sil"` → (Rsi, 1)). Every named form is
    /// the register's low bytes; the high-byte forms `ah`..`dh` are not (they are rejected
    /// by the argument parser with their own message).
    pub fn from_name(name: &str) -> Option<(X86Reg, u8)> {
        use X86Reg::*;
        let legacy: [(X86Reg, [&str; 4]); 8] = [
            (Rax, ["rax", "eax", "ax", "al"]),
            (Rbx, ["rbx", "ebx", "bx", "bl"]),
            (Rcx, ["rcx", "ecx", "cx", "cl"]),
            (Rdx, ["rdx", "edx", "dx", "dl"]),
            (Rsi, ["rsi", "esi", "si", "sil"]),
            (Rdi, ["rdi", "edi", "di", "dil"]),
            (Rbp, ["rbp", "ebp", "bp", "bpl"]),
            (Rsp, ["rsp", "esp", "sp", "spl"]),
        ];
        const WIDTHS: [u8; 4] = [8, 4, 2, 1];
        for (reg, names) in legacy {
            if let Some(i) = names.iter().position(|&n| n == name) {
                return Some((reg, WIDTHS[i]));
            }
        }
        match name {
            "rip" => return Some((Rip, 8)),
            "eip" => return Some((Rip, 4)),
            _ => {}
        }
        // r8..r15 with suffix: none = 64, d = 32, w = 16, b or l = 8 bits.
        let rest = name.strip_prefix('r')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(digits);
        let reg = match number {
            "8" => R8,
            "9" => R9,
            "10" => R10,
            "11" => R11,
            "12" => R12,
            "13" => R13,
            "14" => R14,
            "15" => R15,
            _ => return None,
        };
        let width = match suffix {
            "" => 8,
            "d" => 4,
            "w" => 2,
            "b" | "l" => 1,
            _ => return None,
        };
        Some((reg, width))
    }
}

/// Where a USDT argument's value lives at the probe site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsdtArgLocation {
    /// In a register (`%rdi`, `%edi`, `%dil`: the low `size` bytes of the register).
    Register { reg: X86Reg },
    /// In memory at `base + offset` (`-4@-20(%rbp)`, `8@(%rax)`).
    Memory { base: X86Reg, offset: i64 },
    /// In memory at a symbol's address plus `offset` (`8@seq_iter.6(%rip)`,
    /// `-8@16+table(%rip)`): at runtime that is the symbol's link-time vaddr (see
    /// [`resolve_rip_relative`]) plus the object's load bias, then `offset`.
    RipRelative { symbol: String, offset: i64 },
    /// In memory at `base + index * scale + offset` (`-8@8(%rax,%rdx,8)`, `(,%rcx,4)`).
    Indexed {
        base: Option<X86Reg>,
        index: X86Reg,
        scale: u8,
        offset: i64,
    },
    /// An immediate (`-4@$5`).
    Constant(i64),
}

/// One parsed USDT argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtArg {
    /// Bytes to read: 1, 2, 4 or 8.
    pub size: u8,
    /// The spec's size was negative: sign-extend the value.
    pub signed: bool,
    pub location: UsdtArgLocation,
}

impl UsdtArg {
    /// Widens the low `size` bytes of `raw` to 64 bits: sign-extended when `signed`,
    /// zero-extended otherwise. (The eBPF side does the same after its read.)
    pub fn extend(&self, raw: u64) -> u64 {
        let bits = u32::from(self.size) * 8;
        if bits >= 64 {
            return raw;
        }
        let shift = 64 - bits;
        if self.signed {
            (((raw << shift) as i64) >> shift) as u64
        } else {
            (raw << shift) >> shift
        }
    }
}

/// Parses an x86_64 USDT argument spec: whitespace-separated `[-]N@operand` in AT&T syntax.
///
/// Supported operands: `%reg` (any width), `$imm`, `disp(%reg)`, `sym[±disp](%rip)` /
/// `disp+sym(%rip)`, and `disp(%base,%index,scale)`. A missing `N@` (very old sdt.h) takes
/// the register's width, else 8. Floating-point (`8f@%xmm0`), segment-prefixed (`%fs:8`),
/// high-byte registers (`%ah`) and absolute addresses are rejected with a reason.
pub fn parse_args(spec: &str) -> anyhow::Result<Vec<UsdtArg>> {
    spec.split_ascii_whitespace()
        .enumerate()
        .map(|(i, arg)| parse_arg(arg).with_context(|| format!("argument {i} {arg:?}")))
        .collect()
}

fn parse_arg(arg: &str) -> anyhow::Result<UsdtArg> {
    // The size prefix is digits before the first '@'; symbols in operands never start with
    // a digit, so a '@' later in the operand cannot be mistaken for it.
    let (size, signed, operand) = match arg.split_once('@') {
        Some((prefix, operand))
            if prefix
                .trim_start_matches('-')
                .starts_with(|c: char| c.is_ascii_digit()) =>
        {
            let (signed, digits) = match prefix.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, prefix),
            };
            if digits.ends_with('f') {
                bail!("floating-point arguments are not supported");
            }
            let size: u8 = digits
                .parse()
                .ok()
                .filter(|s| matches!(s, 1 | 2 | 4 | 8))
                .with_context(|| format!("size {digits:?} is not 1, 2, 4 or 8"))?;
            (Some(size), signed, operand)
        }
        _ => (None, false, arg),
    };
    if operand.is_empty() {
        bail!("empty operand");
    }
    let location = parse_operand(operand)?;
    let size = match (size, &location) {
        (Some(s), _) => s,
        (None, UsdtArgLocation::Register { .. }) => {
            let name = operand.trim_start_matches('%');
            X86Reg::from_name(name).map_or(8, |(_, w)| w)
        }
        (None, _) => 8,
    };
    Ok(UsdtArg {
        size,
        signed,
        location,
    })
}

fn parse_operand(op: &str) -> anyhow::Result<UsdtArgLocation> {
    if let Some(name) = op.strip_prefix('%') {
        if name.contains(':') {
            bail!("segment-relative operands (e.g. TLS `%fs:`) are not supported");
        }
        return Ok(UsdtArgLocation::Register {
            reg: parse_reg(name)?,
        });
    }
    if let Some(imm) = op.strip_prefix('$') {
        let value = parse_int(imm).with_context(|| {
            format!("immediate {imm:?} is not a number (symbolic immediates are not supported)")
        })?;
        return Ok(UsdtArgLocation::Constant(value));
    }
    let Some(open) = op.find('(') else {
        bail!("absolute memory operands (no register) are not supported");
    };
    let inner = op[open + 1..]
        .strip_suffix(')')
        .context("memory operand does not end with ')'")?;
    let disp = &op[..open];
    let parts: Vec<&str> = inner.split(',').collect();
    let reg_of = |part: &str, what: &str| -> anyhow::Result<X86Reg> {
        let name = part
            .trim()
            .strip_prefix('%')
            .with_context(|| format!("{what} {part:?} is not a %register"))?;
        parse_reg(name)
    };
    match parts.as_slice() {
        [base] => {
            let base = reg_of(base, "base")?;
            match parse_disp(disp)? {
                Disp::Number(offset) => Ok(UsdtArgLocation::Memory { base, offset }),
                Disp::Symbol { symbol, offset } if base == X86Reg::Rip => {
                    Ok(UsdtArgLocation::RipRelative { symbol, offset })
                }
                Disp::Symbol { .. } => {
                    bail!("a symbolic displacement is only supported with %rip")
                }
            }
        }
        [base, index] | [base, index, _] => {
            let scale = match parts.get(2) {
                None => 1,
                Some(s) => s
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s| matches!(s, 1 | 2 | 4 | 8))
                    .with_context(|| format!("scale {s:?} is not 1, 2, 4 or 8"))?,
            };
            let base = if base.trim().is_empty() {
                None
            } else {
                Some(reg_of(base, "base")?)
            };
            let index = reg_of(index, "index")?;
            if index == X86Reg::Rsp || index == X86Reg::Rip {
                bail!("%{} cannot be an index register", index.name());
            }
            let Disp::Number(offset) = parse_disp(disp)? else {
                bail!("a symbolic displacement with an index register is not supported");
            };
            Ok(UsdtArgLocation::Indexed {
                base,
                index,
                scale,
                offset,
            })
        }
        _ => bail!("memory operand has {} comma-separated parts", parts.len()),
    }
}

fn parse_reg(name: &str) -> anyhow::Result<X86Reg> {
    if matches!(name, "ah" | "bh" | "ch" | "dh") {
        bail!("high-byte register %{name} is not supported");
    }
    X86Reg::from_name(name)
        .map(|(reg, _)| reg)
        .with_context(|| format!("unknown or unsupported register %{name}"))
}

enum Disp {
    Number(i64),
    Symbol { symbol: String, offset: i64 },
}

/// A displacement: empty, a number, `sym`, `sym+N`, `sym-N` or `N+sym`.
fn parse_disp(disp: &str) -> anyhow::Result<Disp> {
    if disp.is_empty() {
        return Ok(Disp::Number(0));
    }
    if let Some(n) = parse_int(disp) {
        return Ok(Disp::Number(n));
    }
    let is_symbol = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$'))
    };
    // `N+sym` (gcc writes `16+table(%rip)`).
    if let Some((number, symbol)) = disp.split_once('+')
        && let Some(offset) = parse_int(number)
        && is_symbol(symbol)
    {
        return Ok(Disp::Symbol {
            symbol: symbol.to_string(),
            offset,
        });
    }
    // `sym`, `sym+N`, `sym-N`.
    let split = disp.find(['+', '-']).unwrap_or(disp.len());
    let (symbol, rest) = disp.split_at(split);
    if is_symbol(symbol) {
        let offset = if rest.is_empty() {
            0
        } else {
            let (negative, number) = rest.split_at(1);
            let n = parse_int(number)
                .filter(|_| !number.starts_with(['+', '-']))
                .with_context(|| format!("bad displacement {disp:?}"))?;
            if negative == "-" { n.wrapping_neg() } else { n }
        };
        return Ok(Disp::Symbol {
            symbol: symbol.to_string(),
            offset,
        });
    }
    bail!("bad displacement {disp:?}")
}

/// Decimal or `0x` hex, optionally negative. Hex up to 64 bits wraps into i64 (gas prints
/// e.g. `0xfffffffffffffff8` for -8 in some contexts).
fn parse_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()? as i64
    } else {
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let v: u64 = digits.parse().ok()?;
        if negative {
            // Allow exactly i64::MIN.
            return (v <= i64::MIN.unsigned_abs()).then(|| (v as i64).wrapping_neg());
        }
        i64::try_from(v).ok()?
    };
    Some(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

/// Resolves the `symbol+offset` of a [`UsdtArgLocation::RipRelative`] argument to a
/// link-time virtual address; at runtime the value is read at that address plus the
/// object's load bias.
///
/// Names like `seq_iter.6` are function-local statics and can exist in several translation
/// units. With several candidates, a global or weak definition wins; otherwise `near_pc`
/// (the probe's pc) picks the local defined in the same source file as the function
/// containing the probe (`STT_FILE` grouping of `.symtab`). If that cannot decide, the
/// error lists the candidates rather than guessing.
pub fn resolve_rip_relative(
    symbols: &SymbolTable,
    symbol: &str,
    offset: i64,
    near_pc: Option<u64>,
) -> anyhow::Result<u64> {
    let candidates = symbols.lookup_all(symbol);
    let distinct = |list: &[&super::Symbol]| {
        let mut addrs: Vec<u64> = list.iter().map(|s| s.vaddr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs
    };
    let chosen = match candidates.as_slice() {
        [] => bail!(
            "symbol {symbol:?} is not in the symbol table ({}); the binary may be stripped",
            symbols.source()
        ),
        list if distinct(list).len() == 1 => list[0].vaddr,
        list => {
            let global: Vec<_> = list
                .iter()
                .copied()
                .filter(|s| s.binding != SymbolBinding::Local)
                .collect();
            let same_file: Vec<_> = near_pc
                .and_then(|pc| symbols.containing_function(pc))
                .and_then(|f| f.file.clone())
                .map(|file| {
                    list.iter()
                        .copied()
                        .filter(|s| s.file.as_ref() == Some(&file))
                        .collect()
                })
                .unwrap_or_default();
            if distinct(&global).len() == 1 {
                global[0].vaddr
            } else if distinct(&same_file).len() == 1 {
                same_file[0].vaddr
            } else {
                let listing: Vec<String> = list
                    .iter()
                    .map(|s| {
                        format!(
                            "{:#x} ({})",
                            s.vaddr,
                            s.file.as_deref().unwrap_or("unknown file")
                        )
                    })
                    .collect();
                bail!(
                    "symbol {symbol:?} is ambiguous: {} definitions: {}",
                    list.len(),
                    listing.join(", ")
                )
            }
        }
    };
    Ok(chosen.wrapping_add_signed(offset))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path, process::Command};

    use super::*;
    use crate::offer::elf::{
        symbols::SymbolTable,
        test_support::{Rng, build_demo, libstdcxx, need_tool, own_libc, python3},
    };

    fn qemu_usdt() -> Option<std::path::PathBuf> {
        xtask::prereq::Prereq::new("elf::usdt::tests (USDT QEMU)").usdt_qemu()
    }

    fn arg(size: u8, signed: bool, location: UsdtArgLocation) -> UsdtArg {
        UsdtArg {
            size,
            signed,
            location,
        }
    }

    fn reg(reg: X86Reg) -> UsdtArgLocation {
        UsdtArgLocation::Register { reg }
    }

    #[test]
    fn pt_regs_offsets_match_kernel_layout() {
        // arch/x86/include/asm/ptrace.h, x86_64: 21 unsigned longs in this order.
        let layout = [
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
        ];
        for reg in X86Reg::ALL {
            let index = layout.iter().position(|&n| n == reg.name()).unwrap();
            assert_eq!(reg.pt_regs_offset(), index * 8, "{reg:?}");
        }
    }

    #[test]
    fn register_names_of_every_width() {
        let cases = [
            ("rax", X86Reg::Rax, 8),
            ("eax", X86Reg::Rax, 4),
            ("ax", X86Reg::Rax, 2),
            ("al", X86Reg::Rax, 1),
            ("sil", X86Reg::Rsi, 1),
            ("dil", X86Reg::Rdi, 1),
            ("bpl", X86Reg::Rbp, 1),
            ("spl", X86Reg::Rsp, 1),
            ("esp", X86Reg::Rsp, 4),
            ("r8", X86Reg::R8, 8),
            ("r8d", X86Reg::R8, 4),
            ("r8w", X86Reg::R8, 2),
            ("r8b", X86Reg::R8, 1),
            ("r15l", X86Reg::R15, 1),
            ("r12d", X86Reg::R12, 4),
            ("rip", X86Reg::Rip, 8),
        ];
        for (name, reg, width) in cases {
            assert_eq!(X86Reg::from_name(name), Some((reg, width)), "{name}");
        }
        for bad in ["r16", "r7", "r8x", "xmm0", "", "r", "rax2", "e8d"] {
            assert_eq!(X86Reg::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_qemu_memory_region_ops_spec() {
        let args = parse_args("-4@%edi 8@%rsi 8@%rdx 8@%rcx 4@%r8d 8@%r9").unwrap();
        assert_eq!(
            args,
            vec![
                arg(4, true, reg(X86Reg::Rdi)),
                arg(8, false, reg(X86Reg::Rsi)),
                arg(8, false, reg(X86Reg::Rdx)),
                arg(8, false, reg(X86Reg::Rcx)),
                arg(4, false, reg(X86Reg::R8)),
                arg(8, false, reg(X86Reg::R9)),
            ]
        );
    }

    #[test]
    fn parses_memory_rip_relative_indexed_and_constants() {
        let cases: &[(&str, UsdtArg)] = &[
            (
                "8@seq_iter.6(%rip)",
                arg(
                    8,
                    false,
                    UsdtArgLocation::RipRelative {
                        symbol: "seq_iter.6".into(),
                        offset: 0,
                    },
                ),
            ),
            (
                "8@foo+16(%rip)",
                arg(
                    8,
                    false,
                    UsdtArgLocation::RipRelative {
                        symbol: "foo".into(),
                        offset: 16,
                    },
                ),
            ),
            (
                "-8@16+table(%rip)",
                arg(
                    8,
                    true,
                    UsdtArgLocation::RipRelative {
                        symbol: "table".into(),
                        offset: 16,
                    },
                ),
            ),
            (
                "4@bar-0x10(%rip)",
                arg(
                    4,
                    false,
                    UsdtArgLocation::RipRelative {
                        symbol: "bar".into(),
                        offset: -16,
                    },
                ),
            ),
            (
                "-4@112(%rsp)",
                arg(
                    4,
                    true,
                    UsdtArgLocation::Memory {
                        base: X86Reg::Rsp,
                        offset: 112,
                    },
                ),
            ),
            (
                "8@-0x18(%rbp)",
                arg(
                    8,
                    false,
                    UsdtArgLocation::Memory {
                        base: X86Reg::Rbp,
                        offset: -24,
                    },
                ),
            ),
            (
                "8@(%rax)",
                arg(
                    8,
                    false,
                    UsdtArgLocation::Memory {
                        base: X86Reg::Rax,
                        offset: 0,
                    },
                ),
            ),
            (
                "-4@8(%rax,%rbx,4)",
                arg(
                    4,
                    true,
                    UsdtArgLocation::Indexed {
                        base: Some(X86Reg::Rax),
                        index: X86Reg::Rbx,
                        scale: 4,
                        offset: 8,
                    },
                ),
            ),
            (
                "8@(,%rcx,8)",
                arg(
                    8,
                    false,
                    UsdtArgLocation::Indexed {
                        base: None,
                        index: X86Reg::Rcx,
                        scale: 8,
                        offset: 0,
                    },
                ),
            ),
            (
                "2@(%r12,%r13)",
                arg(
                    2,
                    false,
                    UsdtArgLocation::Indexed {
                        base: Some(X86Reg::R12),
                        index: X86Reg::R13,
                        scale: 1,
                        offset: 0,
                    },
                ),
            ),
            ("-4@$-7", arg(4, true, UsdtArgLocation::Constant(-7))),
            ("4@$0x10", arg(4, false, UsdtArgLocation::Constant(16))),
            ("-1@%cl", arg(1, true, reg(X86Reg::Rcx))),
            // No size prefix (old sdt.h): the register's own width.
            ("%r9w", arg(2, false, reg(X86Reg::R9))),
        ];
        for (spec, want) in cases {
            let got = parse_args(spec).unwrap_or_else(|e| panic!("{spec}: {e:#}"));
            assert_eq!(got, vec![want.clone()], "{spec}");
        }
        assert_eq!(parse_args("").unwrap(), vec![]);
        assert_eq!(parse_args("  ").unwrap(), vec![]);
    }

    #[test]
    fn rejects_unsupported_and_malformed_specs_clearly() {
        let cases = [
            ("8f@%xmm0", "floating-point"),
            ("16@%rax", "size"),
            ("3@%rax", "size"),
            ("4@%xmm1", "register"),
            ("1@%ah", "high-byte"),
            ("8@%fs:8", "segment"),
            ("8@foo", "absolute"),
            ("8@0x1234", "absolute"),
            ("8@$foo", "immediate"),
            ("8@8(%rax", "')'"),
            ("8@foo(%rax)", "only supported with %rip"),
            ("8@8(%rax,%rsp,2)", "index"),
            ("8@8(%rax,%rbx,3)", "scale"),
            ("8@8(%rax,%rbx,4,5)", "parts"),
            ("8@", "empty operand"),
            ("8@foo++1(%rip)", "displacement"),
            ("8@1+2(%rip)", "displacement"),
        ];
        for (spec, needle) in cases {
            let err = format!("{:#}", parse_args(spec).unwrap_err());
            assert!(err.contains(needle), "{spec}: {err}");
        }
        // The failing argument is named by position.
        let err = format!("{:#}", parse_args("8@%rdi 4@%xmm1").unwrap_err());
        assert!(err.contains("argument 1"), "{err}");
    }

    #[test]
    fn extend_sign_and_zero() {
        let signed = arg(4, true, reg(X86Reg::Rdi));
        assert_eq!(signed.extend(0xdead_beef_ffff_fffe), (-2i64) as u64);
        let unsigned = arg(4, false, reg(X86Reg::Rdi));
        assert_eq!(unsigned.extend(0xdead_beef_ffff_fffe), 0xffff_fffe);
        let byte = arg(1, true, reg(X86Reg::Rax));
        assert_eq!(byte.extend(0x80), (-128i64) as u64);
        assert_eq!(arg(8, true, reg(X86Reg::Rax)).extend(u64::MAX), u64::MAX);
    }

    #[test]
    fn parse_int_edges() {
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int("9223372036854775808"), None);
        assert_eq!(parse_int("0xfffffffffffffff8"), Some(-8));
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_int("-"), None);
        assert_eq!(parse_int("1_0"), None);
    }

    /// One probe as `readelf -n` prints it.
    #[derive(Debug, PartialEq, Eq)]
    struct ReadelfProbe {
        provider: String,
        name: String,
        pc: u64,
        base: u64,
        semaphore: u64,
        args: String,
    }

    /// `readelf -n`'s probes, or `None` after saying why (a failure under
    /// `PROFILER_E2E_REQUIRE`) when binutils is not installed.
    fn readelf_probes(test: &str, path: &Path) -> Option<Vec<ReadelfProbe>> {
        need_tool(test, "readelf", "binutils")?;
        let out = Command::new("readelf")
            .args(["-n", "--wide"])
            .arg(path)
            .output()
            .expect("readelf runs");
        assert!(
            out.status.success(),
            "readelf -n {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = |s: &str| u64::from_str_radix(s.trim().trim_end_matches(','), 16).unwrap();
        let mut probes = Vec::new();
        let mut current: Option<ReadelfProbe> = None;
        for line in text.lines().map(str::trim) {
            // With --wide, "Provider:" shares the line with the note header.
            if let Some((_, p)) = line.split_once("Provider: ") {
                current = Some(ReadelfProbe {
                    provider: p.to_string(),
                    name: String::new(),
                    pc: 0,
                    base: 0,
                    semaphore: 0,
                    args: String::new(),
                });
            } else if let Some(n) = line.strip_prefix("Name: ") {
                current.as_mut().unwrap().name = n.to_string();
            } else if let Some(loc) = line.strip_prefix("Location: ") {
                // "0x..., Base: 0x..., Semaphore: 0x..."
                let fields: Vec<&str> = loc.split(", ").collect();
                let p = current.as_mut().unwrap();
                p.pc = hex(fields[0].trim_start_matches("0x"));
                p.base = hex(fields[1].trim_start_matches("Base: 0x"));
                p.semaphore = hex(fields[2].trim_start_matches("Semaphore: 0x"));
            } else if let Some(a) = line.strip_prefix("Arguments:") {
                let mut p = current.take().unwrap();
                p.args = a.trim().to_string();
                probes.push(p);
            }
        }
        Some(probes)
    }

    /// Compares every probe with `readelf -n` (without readelf: only the parse, after
    /// saying so; a failure under `PROFILER_E2E_REQUIRE`), and checks each site is a `nop`
    /// in the file and each semaphore a zero-initialised u16 in the file.
    fn check_against_readelf(test: &str, path: &Path) -> Vec<UsdtProbe> {
        let bytes = std::fs::read(path).unwrap();
        let probes = parse_usdt_probes(&bytes).unwrap();
        let Some(expected) = readelf_probes(test, path) else {
            return probes;
        };
        assert_eq!(
            probes.len(),
            expected.len(),
            "{}: probe count",
            path.display()
        );
        for (got, want) in probes.iter().zip(&expected) {
            let id = format!("{}: {}:{}", path.display(), want.provider, want.name);
            assert_eq!(got.provider, want.provider, "{id}");
            assert_eq!(got.name, want.name, "{id}");
            // No prelink on this machine: the note's base equals .stapsdt.base, no shift.
            assert_eq!(got.pc, want.pc, "{id}");
            assert_eq!(got.semaphore.unwrap_or(0), want.semaphore, "{id}");
            assert_eq!(got.raw_args, want.args, "{id}");
            assert_eq!(
                bytes[got.pc_file_offset as usize], 0x90,
                "{id}: site is not a nop"
            );
            if let Some(off) = got.semaphore_file_offset {
                let off = off as usize;
                assert_eq!(&bytes[off..off + 2], &[0, 0], "{id}: semaphore not zero");
            }
        }
        probes
    }

    #[test]
    fn python_matches_readelf_with_file_offsets() {
        // Debian's python3 (3.11 in bookworm) is a non-PIE executable at 0x400000 with
        // semaphores in .probes, so file offsets differ from vaddrs: a real test of the
        // conversion.
        let test = "python_matches_readelf_with_file_offsets";
        let Some(python) = python3(test) else {
            return;
        };
        let path = python.as_path();
        let probes = check_against_readelf(test, path);
        assert!(!probes.is_empty());
        let gc_start = probes
            .iter()
            .find(|p| p.provider == "python" && p.name == "gc__start")
            .expect("python:gc__start");
        assert!(gc_start.semaphore.is_some());
        assert!(gc_start.args_error.is_none(), "{:?}", gc_start.args_error);
        for p in &probes {
            assert!(p.args_error.is_none(), "{}: {:?}", p.name, p.args_error);
            // Mapped through PT_LOAD, not assumed equal.
            let expected =
                crate::offer::elf::vaddr_to_file_offset(&std::fs::read(path).unwrap(), p.pc)
                    .unwrap();
            assert_eq!(p.pc_file_offset, expected);
        }
    }

    #[test]
    fn libstdcxx_shared_library_matches_readelf() {
        let test = "libstdcxx_shared_library_matches_readelf";
        let Some(path) = libstdcxx(test) else {
            return;
        };
        let probes = check_against_readelf(test, &path);
        assert!(probes.iter().any(|p| p.provider == "libstdcxx"));
        assert!(probes.iter().all(|p| p.args_error.is_none()));
    }

    #[test]
    fn libc_has_no_probes_on_this_machine_or_matches_readelf() {
        // Debian bookworm's glibc is built without systemtap notes (checked with readelf);
        // where it has them, they must match readelf. The C library this test runs with.
        check_against_readelf(
            "libc_has_no_probes_on_this_machine_or_matches_readelf",
            &own_libc(),
        );
    }

    #[test]
    fn demo_fixture_probes_semaphores_and_rip_relative_args() {
        let test = "demo_fixture_probes_semaphores_and_rip_relative_args";
        let dir = tempfile::tempdir().unwrap();
        let Some(path) = build_demo(test, &dir.path().join("demo"), &[]) else {
            return;
        };
        let probes = check_against_readelf(test, &path);
        let by_name: BTreeMap<&str, &UsdtProbe> =
            probes.iter().map(|p| (p.name.as_str(), p)).collect();
        assert_eq!(
            by_name.keys().copied().collect::<Vec<_>>(),
            ["consts", "guarded", "indexed", "local", "regs"]
        );
        assert!(probes.iter().all(|p| p.provider == "demo"));

        assert_eq!(
            by_name["consts"].args,
            vec![
                arg(4, true, UsdtArgLocation::Constant(5)),
                arg(4, true, UsdtArgLocation::Constant(-7))
            ]
        );
        assert!(
            by_name["regs"]
                .args
                .iter()
                .all(|a| matches!(a.location, UsdtArgLocation::Register { .. })),
            "{:?}",
            by_name["regs"].raw_args
        );
        assert!(by_name["regs"].semaphore.is_none());

        let guarded = by_name["guarded"];
        let sema = guarded.semaphore.expect("guarded probe has a semaphore");
        let symbols = SymbolTable::from_elf_bytes(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            symbols.lookup("demo_guarded_semaphore").map(|s| s.vaddr),
            Some(sema)
        );

        // `counter` is a static in both files: the probe's pc picks the right one.
        let local = by_name["local"];
        let UsdtArgLocation::RipRelative { symbol, offset } = &local.args[0].location else {
            panic!("local arg 0 not RIP-relative: {}", local.raw_args);
        };
        assert_eq!(symbol, "counter");
        let counters = symbols.lookup_all("counter");
        assert_eq!(counters.len(), 2);
        assert!(symbols.lookup("counter").is_none(), "ambiguous local");
        let err = resolve_rip_relative(&symbols, "counter", 0, None).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
        let main_counter = counters
            .iter()
            .find(|s| s.file.as_deref() == Some("usdt_demo_main.c"))
            .unwrap();
        let sema_counter = counters
            .iter()
            .find(|s| s.file.as_deref() == Some("usdt_demo_sema.c"))
            .unwrap();
        assert_eq!(
            resolve_rip_relative(&symbols, symbol, *offset, Some(local.pc)).unwrap(),
            main_counter.vaddr
        );
        let UsdtArgLocation::RipRelative { symbol, offset } = &guarded.args[1].location else {
            panic!("guarded arg 1 not RIP-relative: {}", guarded.raw_args);
        };
        assert_eq!(
            resolve_rip_relative(&symbols, symbol, *offset, Some(guarded.pc)).unwrap(),
            sema_counter.vaddr
        );
        // `16+table(%rip)`: table[2] of a long table.
        let UsdtArgLocation::RipRelative { symbol, offset } = &local.args[1].location else {
            panic!("local arg 1 not RIP-relative: {}", local.raw_args);
        };
        assert_eq!((symbol.as_str(), *offset), ("table", 16));
        assert_eq!(
            resolve_rip_relative(&symbols, symbol, *offset, Some(local.pc)).unwrap(),
            symbols.lookup("table").unwrap().vaddr + 16
        );
        let err = resolve_rip_relative(&symbols, "no_such_symbol", 0, None).unwrap_err();
        assert!(err.to_string().contains("not in the symbol table"), "{err}");
    }

    /// Offset of the first stapsdt note's descriptor in the file.
    fn first_note_desc(bytes: &[u8]) -> usize {
        with_elf(bytes, |elf| {
            let section = elf.section(".note.stapsdt").unwrap();
            let start = section.sh_offset(elf.endian) as usize;
            let namesz = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap());
            Ok(start + 12 + (namesz as usize).next_multiple_of(4))
        })
        .unwrap()
    }

    #[test]
    fn prelink_shift_moves_pc_and_semaphore() {
        let Some(path) = python3("prelink_shift_moves_pc_and_semaphore") else {
            return;
        };
        let mut bytes = std::fs::read(path).unwrap();
        let before = parse_usdt_probes(&bytes).unwrap();
        // Pretend the note was written when .stapsdt.base sat 0x10 higher: every address
        // must then move 0x10 down, as after a prelink that moved the object.
        let desc = first_note_desc(&bytes);
        let base = u64::from_le_bytes(bytes[desc + 8..desc + 16].try_into().unwrap());
        bytes[desc + 8..desc + 16].copy_from_slice(&(base + 0x10).to_le_bytes());
        let after = parse_usdt_probes(&bytes).unwrap();
        assert_eq!(after[0].pc, before[0].pc - 0x10);
        assert_eq!(after[0].pc_file_offset, before[0].pc_file_offset - 0x10);
        assert_eq!(
            after[0].semaphore,
            before[0].semaphore.map(|s| s - 0x10),
            "semaphore shifted too"
        );
        assert_eq!(after[1..], before[1..]);
    }

    #[test]
    fn malformed_notes_are_clear_errors() {
        let Some(path) = python3("malformed_notes_are_clear_errors") else {
            return;
        };
        let bytes = std::fs::read(path).unwrap();
        let desc = first_note_desc(&bytes);
        let header = desc - 12 - 8; // "stapsdt\0" is 8 bytes
        let descsz = u32::from_le_bytes(bytes[header + 4..header + 8].try_into().unwrap());

        let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            f(&mut b);
            format!("{:#}", parse_usdt_probes(&b).unwrap_err())
        };
        // Huge descriptor size.
        let err = mutate(&|b| b[header + 4..header + 8].copy_from_slice(&u32::MAX.to_le_bytes()));
        assert!(err.contains("descriptor size"), "{err}");
        // Descriptor too short for the three addresses and strings.
        let err = with_elf(&bytes, |elf| parse_note(elf, &bytes[desc..desc + 26], None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
        // Strings without NULs.
        let err = mutate(&|b| {
            for x in &mut b[desc + 24..desc + descsz as usize] {
                if *x == 0 {
                    *x = b'x';
                }
            }
        });
        assert!(err.contains("NUL"), "{err}");
        // pc outside every segment.
        let err =
            mutate(&|b| b[desc..desc + 8].copy_from_slice(&0xdead_0000_0000u64.to_le_bytes()));
        assert!(err.contains("not in any file-backed PT_LOAD"), "{err}");
        assert!(err.contains("python:"), "names the probe: {err}");
        // pc in a data segment.
        let err = mutate(&|b| {
            let sema: [u8; 8] = b[desc + 16..desc + 24].try_into().unwrap();
            b[desc..desc + 8].copy_from_slice(&sema);
        });
        assert!(err.contains("non-executable"), "{err}");
        // Semaphore in the read-only text.
        let err = mutate(&|b| {
            let pc: [u8; 8] = b[desc..desc + 8].try_into().unwrap();
            b[desc + 16..desc + 24].copy_from_slice(&pc);
        });
        assert!(err.contains("read-only"), "{err}");
        // Invalid UTF-8 in the provider.
        let err = mutate(&|b| b[desc + 24] = 0xff);
        assert!(err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn not_x86_64_is_a_clear_error() {
        let mut bytes = std::fs::read("/bin/ls").unwrap();
        bytes[18..20].copy_from_slice(&elf::EM_AARCH64.to_le_bytes());
        let err = format!("{:#}", parse_usdt_probes(&bytes).unwrap_err());
        assert!(err.contains("only supported in x86_64"), "{err}");
    }

    #[test]
    fn binary_without_notes_has_no_probes() {
        let bytes = std::fs::read("/bin/ls").unwrap();
        assert_eq!(parse_usdt_probes(&bytes).unwrap(), vec![]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for len in [0, 1, 4, 16, 63, 64, 65, 200, 4096] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(parse_usdt_probes(&bytes).is_err());
            let mut with_magic = bytes.clone();
            if len >= 64 {
                with_magic[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
                let _ = parse_usdt_probes(&with_magic);
            }
        }
        let Some(python) = python3("elf::usdt garbage_never_panics") else {
            return;
        };
        let real = std::fs::read(python).unwrap();
        // Truncations at many points, including inside the notes at the end of the file.
        let note_start = first_note_desc(&real) - 20;
        let mut cuts: Vec<usize> = (0..64).map(|i| i * real.len() / 64).collect();
        cuts.extend((note_start..note_start + 700).step_by(7));
        for cut in cuts {
            let _ = parse_usdt_probes(&real[..cut.min(real.len())]);
        }
        // Random byte flips in the note section and the headers.
        for _ in 0..2000 {
            let mut b = real.clone();
            for _ in 0..1 + rng.below(8) {
                let at = if rng.below(2) == 0 {
                    note_start + rng.below(700.min(real.len() - note_start))
                } else {
                    rng.below(64)
                };
                b[at] = rng.next() as u8;
            }
            let _ = parse_usdt_probes(&b);
        }
    }

    #[test]
    fn qemu_usdt_build_matches_readelf() {
        let Some(path) = qemu_usdt() else {
            return;
        };
        let probes = check_against_readelf("qemu_usdt_build_matches_readelf", &path);
        let bytes = std::fs::read(&path).unwrap();
        let symbols = SymbolTable::from_elf_bytes(&bytes).unwrap();
        for which in ["memory_region_ops_read", "memory_region_ops_write"] {
            let sites: Vec<_> = probes
                .iter()
                .filter(|p| p.provider == "qemu" && p.name == which)
                .collect();
            assert!(!sites.is_empty(), "qemu:{which} missing");
            for p in sites {
                let sema = p.semaphore.expect("QEMU's dtrace probes are guarded");
                let sema_off = p.semaphore_file_offset.unwrap();
                eprintln!(
                    "qemu:{which} pc {:#x} (file {:#x}) semaphore {sema:#x} (file {sema_off:#x}) \
                     args {}",
                    p.pc, p.pc_file_offset, p.raw_args
                );
                // (int cpu_index, void *mr, u64 addr, u64 value, unsigned size, char *name)
                let args = p.parsed_args().unwrap();
                assert_eq!(args.len(), 6, "{}", p.raw_args);
                assert!(args[0].signed && args[0].size == 4, "{}", p.raw_args);
                assert!(
                    args.iter()
                        .all(|a| matches!(a.location, UsdtArgLocation::Register { .. })),
                    "{}",
                    p.raw_args
                );
                // Computed through PT_LOAD: in this build .data's offset != its vaddr.
                assert_eq!(
                    Some(sema_off),
                    symbols.vaddr_to_file_offset(sema),
                    "semaphore offset"
                );
            }
        }
        let failed: Vec<_> = probes.iter().filter(|p| p.args_error.is_some()).collect();
        for p in &failed {
            eprintln!(
                "unparsed: {}:{} {} ({:?})",
                p.provider, p.name, p.raw_args, p.args_error
            );
        }
        assert!(
            failed.is_empty(),
            "{} probes with unparsed args",
            failed.len()
        );
        // Every RIP-relative operand resolves to a symbol.
        let mut rip = 0;
        for p in &probes {
            for a in &p.args {
                if let UsdtArgLocation::RipRelative { symbol, offset } = &a.location {
                    rip += 1;
                    resolve_rip_relative(&symbols, symbol, *offset, Some(p.pc)).unwrap_or_else(
                        |e| panic!("{}:{} {}: {e:#}", p.provider, p.name, p.raw_args),
                    );
                }
            }
        }
        eprintln!(
            "{} probes, {rip} RIP-relative operands resolved",
            probes.len()
        );
    }
}
