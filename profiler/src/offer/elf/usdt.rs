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

    // The file-backed PT_LOAD segment holding `addr`, and its file offset there.
    let segment_of = |addr: u64, what_addr: &str| {
        elf.segments
            .iter()
            .find_map(|s| Some((s, s.file_offset_of(addr)?)))
            .with_context(|| {
                format!(
                    "{}: {what_addr} {addr:#x} is not in any file-backed PT_LOAD segment",
                    what()
                )
            })
    };
    let (pc_segment, pc_file_offset) = segment_of(pc, "pc")?;
    if !pc_segment.is_executable() {
        bail!("{}: pc {pc:#x} is in a non-executable segment", what());
    }

    let semaphore_file_offset = match semaphore {
        None => None,
        Some(sema) => {
            let (segment, offset) = segment_of(sema, "semaphore")?;
            // The kernel and the profiler increment the semaphore in the process's memory.
            if !segment.is_writable() {
                bail!("{}: semaphore {sema:#x} is in a read-only segment", what());
            }
            Some(offset)
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
mod tests;
