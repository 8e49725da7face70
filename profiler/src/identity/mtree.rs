//! Parsing QEMU's `info mtree -f` (the flattened memory map of every address space), as
//! returned by QMP `human-monitor-command`, to name the device behind an I/O port or a guest
//! physical address (the KVM tracepoints `kvm_pio` / `kvm_mmio` only give numbers).
//!
//! Pure: text in, map out. The text comes from a QEMU process, so nothing is trusted: unknown
//! lines are skipped, and garbage yields an empty map, never a panic.
//!
//! # The format, as QEMU prints it
//!
//! From `mtree_info_flatview` / `mtree_print_flatview` in `softmmu/memory.c` (QEMU 7.2) and
//! `system/memory.c` (current QEMU; the function is unchanged apart from the `AccelClass`
//! argument of `has_memory` and `HWADDR_FMT_plx` replacing `TARGET_FMT_plx`):
//!
//! ```text
//! FlatView #<counter>                                  one block per distinct FlatView
//!  AS "<as->name>", root: <root region>[, alias <r>]   one line per address space using it
//!  Root memory region: <view->root name | (none)>
//!   <start>-<end> (prio <p>, [nv-]<type>): <name>[ @<offset_in_region>][ owner...][ KVM]
//!   No rendered FlatView                               (instead of ranges when empty)
//! <blank line>
//! ```
//!
//! * `<start>`/`<end>` are `%016` hex (`HWADDR_FMT_plx`; `TARGET_FMT_plx` before QEMU 8.1,
//!   8 digits on 32-bit targets), `<end>` inclusive (`start + MR_SIZE(size)`, size − 1).
//! * `<type>` is `rom` for a read-only range, else `memory_region_type()`: `ramd`, `romd`,
//!   `rom`, `ram` or `i/o`; `nv-` prefixes non-volatile ranges.
//! * ` @<offset>` follows the name when the range starts inside its region (an alias, or a
//!   region split by a higher-priority one).
//! * With `-o`, `mtree_print_mr_owner()` appends ` owner:{...}` / ` parent:{...}` or
//!   ` orphan`. When the accelerator implements `has_memory` (KVM), ` KVM` is appended once
//!   per address space of the view in which KVM maps the range.
//! * FlatViews are printed in `GHashTable` order: the I/O view may come before or after the
//!   memory view.
//!
//! Which block is which: `memory_map_init()` (`softmmu/physmem.c`, `system/physmem.c`)
//! creates `address_space_memory` named `"memory"` with root region `"system"`, and
//! `address_space_io` named `"I/O"` with root region `"io"`. A view is the port space when
//! an `AS "I/O"` line or `Root memory region: io` heads it, and the MMIO space when an
//! `AS "memory"` line or `Root memory region: system` does. Do not go by a root region
//! *named* `memory`: on x86 that is the SMRAM container of `AS "cpu-smm-0"` (a separate view
//! of the same RAM plus SMRAM), not the system memory view.
//!
//! Unassigned ports belong to the root region itself (`io`, created with
//! `unassigned_io_ops`), so the flat I/O view has `: io @<offset>` ranges between devices and
//! [`MtreeMap::name_for_port`] answers `"io"` there — the name QEMU's own
//! `memory_region_ops_read/write` trace events report for such accesses. Unassigned MMIO has
//! no range (the `system` container has no ops) and yields `None`.

use serde::{Deserialize, Serialize};

/// One range of a flat view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    /// `i/o`, `ram`, `rom`, `romd` or `ramd` (without an `nv-` prefix).
    pub kind: String,
    /// The MemoryRegion's name, without the ` @offset`, owner and accelerator suffixes.
    pub name: String,
}

impl Range {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.end
    }

    /// Number of addresses covered minus one (`end - start`), to compare specificity without
    /// overflowing on a full 64-bit range.
    fn span(&self) -> u64 {
        self.end - self.start
    }
}

/// The port (I/O) and MMIO (memory) flat views of one QEMU process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtreeMap {
    pub io: Vec<Range>,
    pub memory: Vec<Range>,
}

impl MtreeMap {
    pub fn is_empty(&self) -> bool {
        self.io.is_empty() && self.memory.is_empty()
    }

    /// The region handling I/O port `port` (see the module docs for unassigned ports).
    pub fn name_for_port(&self, port: u64) -> Option<&str> {
        innermost(&self.io, port)
    }

    /// The region handling guest physical address `gpa` in the system memory view.
    pub fn name_for_gpa(&self, gpa: u64) -> Option<&str> {
        innermost(&self.memory, gpa)
    }
}

/// The smallest range containing `addr`. Flat-view ranges never overlap, but a hand-made or
/// merged map might; the most specific range is the right answer then.
fn innermost(ranges: &[Range], addr: u64) -> Option<&str> {
    ranges
        .iter()
        .filter(|r| r.contains(addr))
        .min_by_key(|r| r.span())
        .map(|r| r.name.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    Io,
    Memory,
}

/// The flat view being read and what its header lines said so far.
#[derive(Default)]
struct View {
    as_io: bool,
    as_memory: bool,
    root_io: bool,
    root_memory: bool,
    ranges: Vec<Range>,
}

impl View {
    fn space(&self) -> Option<Space> {
        // An address space name is more specific than a root region name; check it first.
        if self.as_io {
            Some(Space::Io)
        } else if self.as_memory {
            Some(Space::Memory)
        } else if self.root_io {
            Some(Space::Io)
        } else if self.root_memory {
            Some(Space::Memory)
        } else {
            None
        }
    }
}

/// Parses `info mtree -f` output. Ranges of views that are neither the I/O nor the system
/// memory view (SMM, PCI bus-master spaces with their own view, ...) are dropped, as are
/// lines that do not parse. Ranges come out sorted by start address.
pub fn parse_mtree_flat(text: &str) -> MtreeMap {
    let mut map = MtreeMap::default();
    let mut view: Option<View> = None;
    let finish = |view: Option<View>, map: &mut MtreeMap| {
        let Some(v) = view else { return };
        match v.space() {
            Some(Space::Io) => map.io.extend(v.ranges),
            Some(Space::Memory) => map.memory.extend(v.ranges),
            None => {}
        }
    };
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("FlatView #") {
            finish(view.take(), &mut map);
            view = Some(View::default());
            continue;
        }
        let Some(v) = view.as_mut() else {
            // Ranges outside a FlatView block (the non-flat `info mtree` tree, or noise).
            continue;
        };
        if let Some(rest) = trimmed.strip_prefix("AS \"") {
            // ` AS "<name>", root: <region>[, alias <region>]`. AS names are free text; the
            // ones that matter ("I/O", "memory") contain no quote.
            if let Some((name, tail)) = rest.split_once("\", root: ") {
                let root = tail.split(", alias ").next().unwrap_or(tail);
                v.as_io |= name == "I/O";
                v.as_memory |= name == "memory";
                // The AS's own root counts too: `root: io` / `root: system`.
                v.root_io |= root == "io";
                v.root_memory |= root == "system";
            }
        } else if let Some(root) = trimmed.strip_prefix("Root memory region: ") {
            v.root_io |= root == "io";
            v.root_memory |= root == "system";
        } else if let Some(range) = parse_range_line(trimmed) {
            v.ranges.push(range);
        }
    }
    finish(view, &mut map);
    map.io.sort_by_key(|r| (r.start, r.end));
    map.memory.sort_by_key(|r| (r.start, r.end));
    map
}

/// `<start>-<end> (prio <p>, [nv-]<type>): <name>[ @<hex>][ owner...][ KVM...]`, trimmed.
fn parse_range_line(line: &str) -> Option<Range> {
    let (addrs, rest) = line.split_once(" (prio ")?;
    let (start, end) = addrs.split_once('-')?;
    let start = parse_hex(start)?;
    let end = parse_hex(end)?;
    if end < start {
        return None;
    }
    let (attrs, name) = rest.split_once("): ")?;
    let (prio, kind) = attrs.split_once(", ")?;
    prio.parse::<i64>().ok()?;
    let kind = kind.strip_prefix("nv-").unwrap_or(kind);
    if !matches!(kind, "i/o" | "ram" | "rom" | "romd" | "ramd") {
        return None;
    }
    let name = clean_name(name)?;
    Some(Range {
        start,
        end,
        kind: kind.to_string(),
        name: name.to_string(),
    })
}

fn parse_hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Strips what QEMU appends after a region name, last first: accelerator markers (` KVM`,
/// once per address space), owner details (`-o`), and the ` @<offset_in_region>` suffix.
/// Region names themselves may contain spaces (`vga ioports remapped`).
fn clean_name(mut name: &str) -> Option<&str> {
    name = name.trim_end();
    while let Some(rest) = name.strip_suffix(" KVM") {
        name = rest.trim_end();
    }
    // `mtree_print_mr_owner`: ` owner:{...}`, ` parent:{...}`, or ` orphan`.
    for marker in [" owner:{", " parent:{"] {
        if let Some(at) = name.find(marker) {
            name = &name[..at];
        }
    }
    if let Some(rest) = name.strip_suffix(" orphan") {
        name = rest;
    }
    if let Some((head, offset)) = name.rsplit_once(" @")
        && parse_hex(offset).is_some()
    {
        name = head;
    }
    let name = name.trim();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/mtree/pc-7.2.txt");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Captured from Debian's QEMU 7.2 (`-machine pc,accel=tcg -usb -device usb-tablet`,
    /// guest booted) with QMP `human-monitor-command` `info mtree -f`: CRLF line ends as QEMU
    /// returns them, the I/O view second, and an SMM view whose root region is *named*
    /// `memory`.
    #[test]
    fn real_pc_7_2_output() {
        let map = parse_mtree_flat(&fixture());
        type Lookup = for<'a> fn(&'a MtreeMap, u64) -> Option<&'a str>;
        let (port, gpa): (Lookup, Lookup) = (MtreeMap::name_for_port, MtreeMap::name_for_gpa);
        for (lookup, address, want) in [
            (port, 0x378, Some("parallel")),
            (port, 0x37f, Some("parallel")),
            (port, 0x3f8, Some("serial")),
            (port, 0x3fd, Some("serial")),
            (port, 0xc000, Some("uhci")),
            (port, 0xc01f, Some("uhci")),
            (port, 0x70, Some("rtc-index")),
            (port, 0x71, Some("rtc")),
            (port, 0xcfa, Some("pci-conf-idx")),
            (port, 0x01f0, Some("ide")),
            (port, 0x380, Some("io")), // unassigned: the root region
            (port, 0xffff, Some("io")),
            (port, 0x10000, None),
            (gpa, 0xfed0_0000, Some("hpet")),
            (gpa, 0xfec0_0010, Some("ioapic")),
            (gpa, 0xfee0_0000, Some("apic-msi")),
            (gpa, 0xfebf_0400, Some("vga ioports remapped")),
            (gpa, 0xfebf_0500, Some("bochs dispi interface")),
            (gpa, 0xfebf_0200, Some("vga.mmio")),
            (gpa, 0x1000, Some("pc.ram")),
            (gpa, 0xa_0000, Some("vga-lowmem")),
            (gpa, 0xffff_fff0, Some("pc.bios")),
            (gpa, 0xfe00_0000, None),
        ] {
            assert_eq!(lookup(&map, address), want, "{address:#x}");
        }

        // The system view, not the SMM one (which maps pc.ram over 0xa0000-0xbffff).
        let low = map.memory.iter().find(|r| r.start == 0xa_0000).unwrap();
        assert_eq!(low.kind, "i/o");
        assert_eq!(map.memory.len(), 21);
        assert_eq!(map.io.len(), 94);
        let bios = map.memory.iter().find(|r| r.name == "pc.bios").unwrap();
        assert_eq!(
            (bios.start, bios.end, bios.kind.as_str()),
            (0xfffc_0000, 0xffff_ffff, "rom")
        );
        let rom = map.memory.iter().find(|r| r.start == 0xc_0000).unwrap();
        assert_eq!((rom.kind.as_str(), rom.name.as_str()), ("rom", "pc.ram"));
        assert!(
            map.io.windows(2).all(|w| w[0].end < w[1].start),
            "sorted, disjoint"
        );
    }

    #[test]
    fn view_order_and_headers_decide_the_space() {
        // I/O first, memory second, identified by AS names.
        let text = "FlatView #0\n AS \"I/O\", root: io\n Root memory region: io\n  \
                    0000000000000060-0000000000000060 (prio 0, i/o): i8042-data\n\n\
                    FlatView #1\n AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n \
                    Root memory region: system\n  \
                    00000000fed00000-00000000fed003ff (prio 0, i/o): hpet\n";
        let map = parse_mtree_flat(text);
        assert_eq!(map.name_for_port(0x60), Some("i8042-data"));
        assert_eq!(map.name_for_gpa(0x60), None);
        assert_eq!(map.name_for_gpa(0xfed0_0004), Some("hpet"));
        assert_eq!(map.name_for_port(0xfed0_0004), None);

        // Only the root region line (an AS renamed, or its line lost).
        let text = "FlatView #0\n Root memory region: io\n  \
                    0000000000000378-000000000000037f (prio 0, i/o): parallel\n";
        assert_eq!(
            parse_mtree_flat(text).name_for_port(0x37a),
            Some("parallel")
        );

        // A root region named `memory` (x86 SMM) and bus-master views are neither.
        let text = "FlatView #2\n AS \"cpu-smm-0\", root: memory\n Root memory region: memory\n  \
                    0000000000000000-00000000000bffff (prio 0, ram): pc.ram\n\
                    FlatView #3\n AS \"i440FX\", root: bus master container\n \
                    Root memory region: (none)\n  No rendered FlatView\n";
        assert!(parse_mtree_flat(text).is_empty());
    }

    #[test]
    fn suffixes_are_stripped() {
        let text = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  \
            0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM\n  \
            00000000000c0000-00000000000c9fff (prio 0, rom): pc.ram @00000000000c0000 KVM KVM\n  \
            00000000fd000000-00000000fdffffff (prio 1, nv-ram): vga.vram owner:{dev id=vga0}\n  \
            00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic owner:{dev path=/machine/ioapic} parent:{obj type=x}\n  \
            00000000fed00000-00000000fed003ff (prio 0, romd): flash orphan\n  \
            00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi @0000000000000000 owner:{obj path=/machine/unattached} KVM\n  \
            00000000fef00000-00000000fef00fff (prio 0, ramd): vfio bar @ 0 thing\n";
        let map = parse_mtree_flat(text);
        let names: Vec<(&str, &str)> = map
            .memory
            .iter()
            .map(|r| (r.kind.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("ram", "pc.ram"),
                ("rom", "pc.ram"),
                ("ram", "vga.vram"),
                ("i/o", "ioapic"),
                ("romd", "flash"),
                ("i/o", "apic-msi"),
                // ` @ 0 thing` is not an offset suffix: part of the name.
                ("ramd", "vfio bar @ 0 thing"),
            ]
        );
    }

    #[test]
    fn innermost_range_wins() {
        let r = |start, end, name: &str| Range {
            start,
            end,
            kind: "i/o".into(),
            name: name.into(),
        };
        let map = MtreeMap {
            io: vec![
                r(0, 0xffff, "io"),
                r(0x3f8, 0x3ff, "serial"),
                r(0x3fa, 0x3fa, "fifo"),
            ],
            memory: vec![r(0, u64::MAX, "all"), r(u64::MAX, u64::MAX, "last")],
        };
        assert_eq!(map.name_for_port(0x3f9), Some("serial"));
        assert_eq!(map.name_for_port(0x3fa), Some("fifo"));
        assert_eq!(map.name_for_port(0x10), Some("io"));
        assert_eq!(map.name_for_gpa(u64::MAX), Some("last"));
        assert_eq!(map.name_for_gpa(0), Some("all"));
    }

    #[test]
    fn bad_lines_are_skipped() {
        let text = "FlatView #0\n AS \"I/O\", root: io\n\
            0000000000000378-000000000000037f (prio 0, i/o): parallel\n\
            0000000000000400-00000000000003ff (prio 0, i/o): backwards\n\
            00000000000004zz-00000000000004ff (prio 0, i/o): nothex\n\
            00000000000004d0-00000000000004d0 (prio x, i/o): badprio\n\
            00000000000004d0-00000000000004d0 (prio 0, weird): badkind\n\
            00000000000004d0-00000000000004d0 (prio 0, i/o): \n\
            000000000000000000-00000000000004d0 (prio 0, i/o): toolong\n\
            0000000000000510-0000000000000511 (prio 0, i/o)\n\
            0000000000000510 (prio 0, i/o): nodash\n\
            0000000000000060-0000000000000060 (prio -1, i/o): negative-prio-ok\n";
        let map = parse_mtree_flat(text);
        let names: Vec<&str> = map.io.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["negative-prio-ok", "parallel"]);
    }

    #[test]
    fn garbage_gives_an_empty_map() {
        for text in [
            "",
            "unknown command: 'info mtree -f'",
            "\0\u{1}\u{ffff}FlatView #",
            "0000000000000378-000000000000037f (prio 0, i/o): parallel (no FlatView header)",
            // The non-flat tree has no FlatView blocks.
            "address-space: I/O\n  0000000000000000-000000000000ffff (prio 0, i/o): io\n",
        ] {
            assert!(parse_mtree_flat(text).is_empty(), "{text:?}");
        }
        // Deterministic fuzz: mangled copies of the real fixture never panic.
        let real = fixture();
        let bytes = real.as_bytes();
        let mut next = crate::testing::xorshift();
        for _ in 0..300 {
            let mut b = bytes.to_vec();
            for _ in 0..(next() % 40) {
                let at = (next() % b.len() as u64) as usize;
                b[at] = (next() % 256) as u8;
            }
            let cut = (next() % (b.len() as u64 + 1)) as usize;
            let text = String::from_utf8_lossy(&b[..cut]);
            let map = parse_mtree_flat(&text);
            for r in map.io.iter().chain(&map.memory) {
                assert!(r.start <= r.end && !r.name.is_empty());
            }
            let _ = map.name_for_port(next() % 0x10000);
            let _ = map.name_for_gpa(next());
        }
    }
}
