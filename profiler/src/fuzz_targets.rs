//! Entry points for the fuzzers (`fuzz/`, cargo-fuzz) and for the regression tests that replay
//! what they found (`profiler/tests/fuzz_regressions.rs`, run by `cargo xtask test`): every
//! parser fed from outside the process, from raw bytes. Each must return — never panic, hang
//! or allocate without bound — whatever the bytes.

/// A fuzz target's entry point.
pub type FuzzTarget = fn(&[u8]);

/// The fuzz targets: (name, entry point). The name is the `fuzz/fuzz_targets/NAME.rs` file and
/// the `fuzz/regressions/NAME/` directory.
pub const TARGETS: &[(&str, FuzzTarget)] = &[
    ("elf_usdt_notes", elf_usdt_notes),
    ("usdt_args", usdt_args),
    ("elf_symbols", elf_symbols),
    ("dwarf_members", dwarf_members),
    ("qmp_session", qmp_session),
    ("mtree", mtree),
    ("proc_cmdline", proc_cmdline),
    ("proc_stat", proc_stat),
    ("tracefs_format", tracefs_format),
    ("recording", recording),
    ("libvirt_status", libvirt_status),
];

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// ELF bytes → USDT notes (`.note.stapsdt`) and each probe's argument spec.
pub fn elf_usdt_notes(data: &[u8]) {
    if let Ok(probes) = crate::offer::elf::usdt::parse_usdt_probes(data) {
        for p in &probes {
            let _ = p.parsed_args();
        }
    }
    let _ = crate::offer::usdt::find_region_ops_sites(data);
}

/// A USDT argument spec string (`-4@%edi 8@seq_iter.6(%rip)`).
pub fn usdt_args(data: &[u8]) {
    let _ = crate::offer::elf::usdt::parse_args(&text(data));
}

/// ELF bytes → symbol table, load segments, file offsets.
pub fn elf_symbols(data: &[u8]) {
    if let Ok(table) = crate::offer::elf::SymbolTable::from_elf_bytes(data) {
        let _ = table.lookup("memory_region_dispatch_read");
        let _ = table.symbolize(0x1000);
    }
    let _ = crate::offer::elf::load_segments(data);
}

/// ELF bytes → DWARF member offsets, as the symbols source looks them up.
pub fn dwarf_members(data: &[u8]) {
    for (s, m) in [
        ("MemoryRegion", "name"),
        ("QEMUTimer", "cb"),
        ("Object", "class"),
    ] {
        let _ = crate::offer::elf::dwarf::member_offset(data, s, m);
    }
}

/// A QMP peer's bytes → greeting, capabilities, `info mtree -f`.
pub fn qmp_session(data: &[u8]) {
    let _ = crate::identity::qmp::session_against(data);
}

/// `info mtree -f` text → the address map, and lookups in it.
pub fn mtree(data: &[u8]) {
    let map = crate::identity::mtree::parse_mtree_flat(&text(data));
    let _ = map.name_for_port(0x378);
    let _ = map.name_for_gpa(0xfebf_0000);
}

/// `/proc/PID/cmdline` bytes → QEMU's argv → identity, devices, QMP sockets.
pub fn proc_cmdline(data: &[u8]) {
    let argv = crate::identity::discovery::split_cmdline(data);
    let parsed = crate::identity::cmdline::parse_cmdline(&argv);
    let _ = crate::identity::cmdline::effective_devices(&parsed);
    let _ = crate::identity::discovery::detect_accel(&parsed, None);
}

/// `/proc/PID/stat`, `/proc/stat`, `/proc/self/status` text.
pub fn proc_stat(data: &[u8]) {
    let t = text(data);
    let _ = crate::identity::discovery::parse_stat(&t);
    let _ = crate::identity::discovery::parse_proc_stat(&t);
    let _ = crate::probes::host::parse_cap_eff(&t);
}

/// A tracefs event `format` file.
pub fn tracefs_format(data: &[u8]) {
    let _ = crate::offer::tracefs::parse_format(&text(data));
}

/// A recording (JSON lines) → every command that reads recordings: report (all formats),
/// check, compare, capacity.
pub fn recording(data: &[u8]) {
    let Ok((records, _)) = crate::record::read_records(data) else {
        return;
    };
    for format in [
        crate::analysis::report::ReportFormat::Table,
        crate::analysis::report::ReportFormat::Csv,
        crate::analysis::report::ReportFormat::Markdown,
    ] {
        let _ = crate::analysis::report::render(&records, format);
    }
    let classes = crate::identity::devices::CLASSES.iter().collect();
    let report = crate::analysis::check::check(
        &records,
        &crate::analysis::check::CheckRequest {
            classes,
            settle: 0.0,
            max_timer_rate: Some(10.0),
            max_wakeup_rate: Some(10.0),
        },
    );
    let _ = crate::analysis::check::render_text(&report);
    let c = crate::analysis::compare::compare(&records, &records, &[], 0.0);
    let _ = crate::analysis::compare::render_text(&c);
    let cap = crate::analysis::capacity::capacity(
        &records,
        &crate::analysis::capacity::CapacityRequest {
            target_util: 0.8,
            ..crate::analysis::capacity::CapacityRequest::WHOLE_HOST
        },
        2.0,
    );
    let _ = crate::analysis::capacity::render_text(&cap);
}

/// libvirt's live status XML (`/run/libvirt/qemu/NAME.xml`).
pub fn libvirt_status(data: &[u8]) {
    let _ = crate::identity::libvirt::parse_status(&text(data));
}
