//! Struct member offsets from DWARF: where `QEMUTimer.cb` or `MemoryRegion.name` lives in this
//! particular QEMU build, so an eBPF probe can read it without hard-coding a layout.
//!
//! Fast path over `.debug_info`: entries are walked raw (abbreviation + attribute skipping),
//! and only `DW_TAG_structure_type` / `DW_TAG_typedef` entries have their attributes read.
//! The first complete definition (not `DW_AT_declaration`) wins, so the walk stops at the
//! first compilation unit that defines the struct; it only reads all of `.debug_info` when
//! the struct is absent.
//!
//! Compressed debug sections (`SHF_COMPRESSED`, or GNU `.zdebug_*`) are not decompressed
//! here; they are a clear error that says how to decompress them.

use anyhow::{Context, bail};
use gimli::{
    AttributeValue, DebuggingInformationEntry, Dwarf, EndianSlice, Reader, RunTimeEndian,
    SectionId, Unit, UnitOffset, constants,
};
use object::{
    Endianness,
    elf::SHF_COMPRESSED,
    read::elf::{SectionHeader, SectionTable},
};

use super::with_elf;

type R<'a> = EndianSlice<'a, RunTimeEndian>;

/// Byte offset of `member` inside `struct struct_name` (or a typedef of that name to a
/// struct), from the DWARF in `elf_bytes`. `Ok(None)` when the debug info has no complete
/// definition of the struct, or the struct has no such member. Members of anonymous
/// struct/union members are found too (their offsets add up).
///
/// Errors: not a 64-bit ELF, no `.debug_info`, compressed debug sections, malformed DWARF.
pub fn member_offset(
    elf_bytes: &[u8],
    struct_name: &str,
    member: &str,
) -> anyhow::Result<Option<u64>> {
    with_elf(elf_bytes, |elf| {
        if elf.section(".zdebug_info").is_some() {
            bail!(
                "the debug info is compressed (GNU .zdebug_* sections), which is not supported; \
                 decompress it with `objcopy --decompress-debug-sections`"
            );
        }
        let Some(info) = elf.section(".debug_info") else {
            bail!(
                "no DWARF debug info (.debug_info) in this ELF file: it is stripped, or its \
                 debug info is in a separate file"
            );
        };
        if info.sh_type(elf.endian) == object::elf::SHT_NOBITS {
            bail!("no DWARF debug info: .debug_info has no contents (SHT_NOBITS)");
        }
        let endian = match elf.endian {
            Endianness::Little => RunTimeEndian::Little,
            Endianness::Big => RunTimeEndian::Big,
        };
        let dwarf = Dwarf::load(|id: SectionId| -> anyhow::Result<R<'_>> {
            let data = section_bytes(&elf.sections, elf.endian, elf.data, id.name())?;
            Ok(EndianSlice::new(data, endian))
        })?;
        find_member(&dwarf, struct_name, member)
            .with_context(|| format!("reading DWARF for {struct_name}.{member}"))
    })
}

/// Contents of debug section `name`, or empty if absent. Compressed sections are an error.
fn section_bytes<'data>(
    sections: &SectionTable<'data, object::elf::FileHeader64<Endianness>>,
    endian: Endianness,
    data: &'data [u8],
    name: &str,
) -> anyhow::Result<&'data [u8]> {
    let Some((_, section)) = sections.section_by_name(endian, name.as_bytes()) else {
        return Ok(&[]);
    };
    if section.sh_flags(endian) & u64::from(SHF_COMPRESSED) != 0 {
        bail!(
            "debug section {name} is compressed (SHF_COMPRESSED), which is not supported; \
             decompress it with `objcopy --decompress-debug-sections`"
        );
    }
    if section.sh_type(endian) == object::elf::SHT_NOBITS {
        return Ok(&[]);
    }
    section
        .data(endian, data)
        .map_err(|e| anyhow::anyhow!("section {name} lies outside the file: {e}"))
}

fn find_member(
    dwarf: &Dwarf<R<'_>>,
    struct_name: &str,
    member: &str,
) -> anyhow::Result<Option<u64>> {
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        if let Some(found) = search_unit(dwarf, &unit, struct_name, member)? {
            return Ok(found);
        }
    }
    // DWARF 4 type units (`-fdebug-types-section`).
    let mut units = dwarf.type_units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        if let Some(found) = search_unit(dwarf, &unit, struct_name, member)? {
            return Ok(found);
        }
    }
    Ok(None)
}

/// `Some(answer)` once a complete definition of the struct is found in `unit` (the answer
/// being the member's offset, or `None` if it has no such member); `None` to keep looking.
fn search_unit(
    dwarf: &Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    struct_name: &str,
    member: &str,
) -> anyhow::Result<Option<Option<u64>>> {
    let mut raw = unit.entries_raw(None)?;
    while !raw.is_empty() {
        let offset = raw.next_offset();
        let Some(abbrev) = raw.read_abbreviation()? else {
            continue;
        };
        let tag = abbrev.tag();
        if tag != constants::DW_TAG_structure_type
            && tag != constants::DW_TAG_class_type
            && tag != constants::DW_TAG_typedef
        {
            raw.skip_attributes(abbrev.attributes())?;
            continue;
        }
        let mut name_matches = false;
        let mut declaration = false;
        let mut type_ref = None;
        for spec in abbrev.attributes() {
            let attr = raw.read_attribute(*spec)?;
            match attr.name() {
                constants::DW_AT_name => {
                    let name = dwarf.attr_string(unit, attr.value())?;
                    name_matches = name.slice() == struct_name.as_bytes();
                }
                constants::DW_AT_declaration => {
                    declaration = matches!(attr.value(), AttributeValue::Flag(true));
                }
                constants::DW_AT_type => type_ref = Some(attr.value()),
                _ => {}
            }
        }
        if !name_matches {
            continue;
        }
        if tag == constants::DW_TAG_typedef {
            // `typedef struct { ... } Name;` or `typedef struct Name_s { ... } Name;`.
            if let Some(t) = type_ref
                && let Some(answer) = member_via_type(dwarf, unit, t, member, 0)?
            {
                return Ok(Some(answer));
            }
            continue;
        }
        if declaration || !abbrev.has_children() {
            continue;
        }
        return Ok(Some(member_in_struct(dwarf, unit, offset, member, 0)?));
    }
    Ok(None)
}

/// Follows typedefs and cv-qualifiers from `at` to a complete struct/union definition.
fn complete_struct_through_typedefs(
    unit: &Unit<R<'_>>,
    mut at: UnitOffset,
) -> anyhow::Result<Option<UnitOffset>> {
    for _ in 0..8 {
        let entry = unit.entry(at)?;
        match entry.tag() {
            constants::DW_TAG_structure_type
            | constants::DW_TAG_class_type
            | constants::DW_TAG_union_type => {
                let declaration = matches!(
                    entry.attr_value(constants::DW_AT_declaration),
                    Some(AttributeValue::Flag(true))
                );
                return Ok((!declaration && entry.has_children()).then_some(at));
            }
            constants::DW_TAG_typedef
            | constants::DW_TAG_const_type
            | constants::DW_TAG_volatile_type => match type_of(&entry) {
                Some(next) => at = next,
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Looks for `member` in the struct/union a `DW_AT_type` value leads to: a reference into
/// this unit, or a type signature (`DW_FORM_ref_sig8`, DWARF 4 `.debug_types` or DWARF 5
/// type units). `None` when it does not lead to a complete struct/union.
fn member_via_type(
    dwarf: &Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    value: AttributeValue<R<'_>>,
    member: &str,
    depth: u32,
) -> anyhow::Result<Option<Option<u64>>> {
    match value {
        AttributeValue::UnitRef(r) => match complete_struct_through_typedefs(unit, r)? {
            Some(at) => Ok(Some(member_in_struct(dwarf, unit, at, member, depth)?)),
            None => Ok(None),
        },
        AttributeValue::DebugTypesRef(signature) => {
            let Some((type_unit, at)) = find_type_unit(dwarf, signature)? else {
                return Ok(None);
            };
            match complete_struct_through_typedefs(&type_unit, at)? {
                Some(at) => Ok(Some(member_in_struct(
                    dwarf, &type_unit, at, member, depth,
                )?)),
                None => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// The type unit with `signature`, and the offset of its type.
fn find_type_unit<'a>(
    dwarf: &Dwarf<R<'a>>,
    signature: gimli::DebugTypeSignature,
) -> anyhow::Result<Option<(Unit<R<'a>>, UnitOffset)>> {
    let matches = |header: &gimli::UnitHeader<R<'a>>| match header.type_() {
        gimli::UnitType::Type {
            type_signature,
            type_offset,
        } if type_signature == signature => Some(type_offset),
        _ => None,
    };
    let mut units = dwarf.type_units();
    while let Some(header) = units.next()? {
        if let Some(at) = matches(&header) {
            return Ok(Some((dwarf.unit(header)?, at)));
        }
    }
    // DWARF 5 puts type units in .debug_info.
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        if let Some(at) = matches(&header) {
            return Ok(Some((dwarf.unit(header)?, at)));
        }
    }
    Ok(None)
}

fn type_of(entry: &DebuggingInformationEntry<R<'_>>) -> Option<UnitOffset> {
    match entry.attr_value(constants::DW_AT_type) {
        Some(AttributeValue::UnitRef(r)) => Some(r),
        _ => None,
    }
}

/// Offset of `member` among the children of the struct/union at `at`, looking into
/// anonymous struct/union members (bounded depth).
fn member_in_struct(
    dwarf: &Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    at: UnitOffset,
    member: &str,
    depth: u32,
) -> anyhow::Result<Option<u64>> {
    if depth > 8 {
        return Ok(None);
    }
    let mut tree = unit.entries_tree(Some(at))?;
    let root = tree.root()?;
    let mut children = root.children();
    let mut anonymous = Vec::new();
    while let Some(child) = children.next()? {
        let entry = child.entry();
        if entry.tag() != constants::DW_TAG_member {
            continue;
        }
        match entry.attr_value(constants::DW_AT_name) {
            Some(name) => {
                if dwarf.attr_string(unit, name)?.slice() == member.as_bytes() {
                    return member_location(entry).map(Some);
                }
            }
            None => {
                if let Some(t) = entry.attr_value(constants::DW_AT_type) {
                    anonymous.push((member_location(entry)?, t));
                }
            }
        }
    }
    for (base, t) in anonymous {
        if let Some(Some(off)) = member_via_type(dwarf, unit, t, member, depth + 1)? {
            return Ok(Some(base + off));
        }
    }
    Ok(None)
}

/// `DW_AT_data_member_location` as a constant or a `DW_OP_plus_uconst` / `DW_OP_constu`
/// expression; `DW_AT_data_bit_offset` (bitfields) rounded down to bytes; 0 when absent
/// (union members).
fn member_location(entry: &DebuggingInformationEntry<R<'_>>) -> anyhow::Result<u64> {
    match entry.attr(constants::DW_AT_data_member_location) {
        Some(attr) => {
            if let Some(v) = attr.udata_value() {
                return Ok(v);
            }
            if let Some(expr) = attr.exprloc_value() {
                let mut r = expr.0;
                let op = r.read_u8()?;
                if (op == constants::DW_OP_plus_uconst.0 || op == constants::DW_OP_constu.0)
                    && let Ok(v) = r.read_uleb128()
                    && r.is_empty()
                {
                    return Ok(v);
                }
                bail!("unsupported DW_AT_data_member_location expression (opcode {op:#x})");
            }
            bail!(
                "unsupported DW_AT_data_member_location form: {:?}",
                attr.value()
            )
        }
        None => Ok(entry
            .attr(constants::DW_AT_data_bit_offset)
            .and_then(|a| a.udata_value())
            .map_or(0, |bits| bits / 8)),
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command, time::Instant};

    use super::*;
    use crate::offer::elf::test_support::{missing, need_tool};

    const FIXTURE_A: &str = r#"
        #include <stddef.h>
        struct Declared;                       /* declaration only, in this CU */
        struct Declared *use_declared;
        typedef struct { char pad[40]; long x; } AnonTypedef;
        typedef struct Named_s { int a; void *b; } Named;
        struct Outer {
            int first;                           /* 0 */
            union { long u_long; char u_bytes[8]; }; /* 8: anonymous union */
            struct { int deep_a; int deep_b; };  /* 16, 20 */
            unsigned flag : 3;                   /* bitfield, 24 */
            void (*cb)(void *);                  /* 32 */
            void *opaque;                        /* 40 */
        };
        struct Outer outer;
        AnonTypedef anon_typedef;
        Named named;
        int offsets[] = {
            offsetof(struct Outer, u_long), offsetof(struct Outer, deep_b),
            offsetof(struct Outer, cb), offsetof(struct Outer, opaque),
            offsetof(AnonTypedef, x), offsetof(Named, b),
        };
    "#;
    const FIXTURE_B: &str = r#"
        struct Declared { char c; long later; }; /* defined in the second CU */
        struct Declared declared;
        int main(void) { return 0; }
    "#;

    /// Builds the two-CU fixture with `cc -g -c` plus `flags`, linked. `None` after saying
    /// why (a failure under `PROFILER_E2E_REQUIRE`) without `cc` or when it cannot build it.
    fn build(test: &str, dir: &Path, flags: &[&str]) -> Option<Vec<u8>> {
        need_tool(test, "cc", "build-essential")?;
        std::fs::write(dir.join("a.c"), FIXTURE_A).unwrap();
        std::fs::write(dir.join("b.c"), FIXTURE_B).unwrap();
        let out = dir.join("fixture");
        let result = Command::new("cc")
            .args(["-g", "-O0", "-o"])
            .arg(&out)
            .arg(dir.join("a.c"))
            .arg(dir.join("b.c"))
            .args(flags)
            .output();
        match result {
            Ok(o) if o.status.success() => Some(std::fs::read(&out).unwrap()),
            Ok(o) => missing(
                test,
                &format!(
                    "cc {flags:?} cannot build the DWARF fixture: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => missing(test, &format!("cc does not run: {e}")),
        }
    }

    #[test]
    fn offsets_from_a_compiled_fixture() {
        let dir = tempfile::tempdir().unwrap();
        for flags in [
            &["-gdwarf-4"][..],
            &["-gdwarf-5"],
            &["-gdwarf-4", "-fdebug-types-section"],
        ] {
            let Some(elf) = build("offsets_from_a_compiled_fixture", dir.path(), flags) else {
                return;
            };
            let off = |s: &str, m: &str| member_offset(&elf, s, m).unwrap();
            assert_eq!(off("Outer", "first"), Some(0), "{flags:?}");
            assert_eq!(off("Outer", "u_long"), Some(8), "{flags:?}");
            assert_eq!(off("Outer", "u_bytes"), Some(8), "{flags:?}");
            assert_eq!(off("Outer", "deep_b"), Some(20), "{flags:?}");
            assert_eq!(off("Outer", "flag"), Some(24), "{flags:?}");
            assert_eq!(off("Outer", "cb"), Some(32), "{flags:?}");
            assert_eq!(off("Outer", "opaque"), Some(40), "{flags:?}");
            assert_eq!(off("Outer", "missing"), None, "{flags:?}");
            assert_eq!(off("NoSuchStruct", "x"), None, "{flags:?}");
            // Typedef names, anonymous or tagged structs behind them.
            assert_eq!(off("AnonTypedef", "x"), Some(40), "{flags:?}");
            assert_eq!(off("Named", "b"), Some(8), "{flags:?}");
            assert_eq!(off("Named_s", "b"), Some(8), "{flags:?}");
            // Declared in the first CU, defined in the second: the definition is used.
            assert_eq!(off("Declared", "later"), Some(8), "{flags:?}");
        }
    }

    #[test]
    fn clear_errors() {
        let err = member_offset(b"not an elf", "A", "b").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let test = "clear_errors";
        // Stripped: no .debug_info.
        if let Some(elf) = build(test, dir.path(), &["-s"]) {
            let err = member_offset(&elf, "Outer", "cb").unwrap_err();
            assert!(err.to_string().contains("no DWARF debug info"), "{err}");
        }
        // SHF_COMPRESSED sections (zlib).
        if let Some(elf) = build(test, dir.path(), &["-gz=zlib"]) {
            let err = format!("{:#}", member_offset(&elf, "Outer", "cb").unwrap_err());
            crate::testing::assert_contains(&err, "compressed (SHF_COMPRESSED)");
            crate::testing::assert_contains(&err, "objcopy --decompress-debug-sections");
        }
        // Truncated debug info: an error, never a panic.
        if let Some(mut elf) = build(test, dir.path(), &["-gdwarf-5"]) {
            let (off, size) = super::super::with_elf(&elf, |e| {
                let s = e.section(".debug_info").unwrap();
                Ok((s.sh_offset(e.endian) as usize, s.sh_size(e.endian) as usize))
            })
            .unwrap();
            // Garble the abbreviation codes and sizes in the middle of .debug_info.
            for b in &mut elf[off + size / 3..off + size / 2] {
                *b = 0xff;
            }
            let _ = member_offset(&elf, "Declared", "later");
        }
    }

    /// The QEMU built with USDT probes and DWARF by `cargo xtask setup` (not committed).
    #[test]
    fn qemu_timer_and_memory_region_offsets() {
        let Some(path) =
            xtask::prereq::Prereq::new("qemu_timer_and_memory_region_offsets").usdt_qemu()
        else {
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let cb = member_offset(&bytes, "QEMUTimer", "cb").unwrap();
        let t_cb = started.elapsed();
        let opaque = member_offset(&bytes, "QEMUTimer", "opaque").unwrap();
        let started = Instant::now();
        let name = member_offset(&bytes, "MemoryRegion", "name").unwrap();
        let t_name = started.elapsed();
        let started = Instant::now();
        let absent = member_offset(&bytes, "NoSuchStructAnywhere", "x").unwrap();
        let t_full = started.elapsed();
        eprintln!(
            "{}: QEMUTimer.cb = {cb:?} ({t_cb:?}), QEMUTimer.opaque = {opaque:?}, \
             MemoryRegion.name = {name:?} ({t_name:?}); full scan for an absent struct: \
             {t_full:?}",
            path.display()
        );
        assert_eq!(cb, Some(16));
        assert_eq!(opaque, Some(24));
        // QEMU 7.2 as built by xtask (x86_64); gdb's `&((MemoryRegion*)0)->name` agrees.
        assert_eq!(name, Some(232));
        assert_eq!(absent, None);
    }
}
