//! Probes that need QEMU's symbols (an unstripped binary or its debug file):
//!
//! - `region_dispatch`: uprobes on `memory_region_dispatch_read` / `_write`
//!   `(MemoryRegion *mr, hwaddr addr, uint64_t *pval / data, MemOp op, MemTxAttrs attrs)`,
//!   the read/write source when the binary has no USDT probes. The BPF cookie carries the
//!   counter kind (high 32 bits) and the offset of `MemoryRegion.name` (low 32 bits, from
//!   DWARF), so the region's name can be read once per region.
//! - `timer_mod`: uprobes on `timer_mod_ns` / `timer_mod_anticipate_ns` `(QEMUTimer *ts, ...)`
//!   record which callbacks (`ts->cb`, offset in the cookie) a process arms; userspace then
//!   attaches `timer_callback` to each of those functions, which counts the callback's runs.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_attach_cookie, bpf_probe_read_user, bpf_probe_read_user_str_bytes},
    macros::{map, uprobe},
    maps::{HashMap, PerCpuArray},
    programs::ProbeContext,
};
use profiler_common::{
    CounterKey, MAX_REGION_NAMES, REGION_NAME_LEN, RegionKey, RegionName, UNNAMED_REGION_MARK,
    dropped, kind, link_generation,
};

use crate::maps::{
    REGION_NAMES, add_new, atomic_add, count, counter, current_ids, note_insert,
    read_write_link_counts, watched_uprobe_hit,
};

/// (process, callback address) of every QEMU timer callback armed since watching began.
#[map]
pub static SEEN_CALLBACKS: HashMap<RegionKey, u64> = HashMap::with_max_entries(MAX_REGION_NAMES, 0);

/// Entries added to [`SEEN_CALLBACKS`] (per CPU): userspace reads that map only when this grew.
#[map]
pub static SEEN_CALLBACKS_ADDED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The link's BPF cookie: its [`link_generation`] and the site's own cookie.
#[inline(always)]
fn cookie(ctx: &ProbeContext) -> u64 {
    // SAFETY: the helper only reads the attach cookie.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

/// One map lookup per event: the uprobe is scoped to the watched process and detached when
/// it is unwatched, so the process is not looked up again (unless a budget duty-cycles it).
#[uprobe]
pub fn region_dispatch(ctx: ProbeContext) -> u32 {
    let (tgid, _) = current_ids();
    let cookie = cookie(&ctx);
    if !read_write_link_counts(tgid, cookie) {
        return 0;
    }
    let cookie = link_generation::strip(cookie);
    let Some(region) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let key = CounterKey {
        tgid,
        kind: (cookie >> 32) as u32,
        id: region,
    };
    match counter(&key) {
        Some(value) => atomic_add(value, 1),
        None => {
            remember_name(tgid, region, cookie & 0xffff_ffff);
            add_new(&key, 1);
        }
    }
    0
}

/// Reads `mr->name` the first time this process touches `mr`.
#[inline(never)]
fn remember_name(tgid: u32, region: u64, name_offset: u64) {
    let name_key = RegionKey {
        tgid,
        _pad: 0,
        region,
    };
    // SAFETY: presence check only.
    if name_offset == 0 || unsafe { REGION_NAMES.get(name_key) }.is_some() {
        return;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(name_ptr) = (unsafe { bpf_probe_read_user((region + name_offset) as *const u64) })
    else {
        return;
    };
    let mut name = RegionName {
        name: [0; REGION_NAME_LEN],
    };
    if name_ptr == 0 {
        // An unnamed region: QEMU's subpages (sub-page MMIO such as the HPET's 1 KiB window
        // goes through a nameless "subpage" region whose ops dispatch again to the real
        // region). Marked so userspace does not count the access twice.
        name.name[0] = UNNAMED_REGION_MARK;
        note_insert(
            dropped::REGION_NAMES,
            REGION_NAMES.insert(name_key, name, 0),
        );
        return;
    }
    // SAFETY: bounded copy checked by the helper.
    if unsafe { bpf_probe_read_user_str_bytes(name_ptr as *const u8, &mut name.name) }.is_ok() {
        note_insert(
            dropped::REGION_NAMES,
            REGION_NAMES.insert(name_key, name, 0),
        );
    }
}

#[uprobe]
pub fn timer_mod(ctx: ProbeContext) -> u32 {
    let (tgid, _) = current_ids();
    let cookie = cookie(&ctx);
    if watched_uprobe_hit(tgid, cookie).is_none() {
        return 0;
    }
    let cb_offset = link_generation::strip(cookie);
    let Some(timer) = ctx.arg::<u64>(0) else {
        return 0;
    };
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(cb) = (unsafe { bpf_probe_read_user((timer + cb_offset) as *const u64) }) else {
        return 0;
    };
    let key = RegionKey {
        tgid,
        _pad: 0,
        region: cb,
    };
    // SAFETY: presence check only.
    if unsafe { SEEN_CALLBACKS.get(key) }.is_none() {
        let added = SEEN_CALLBACKS.insert(key, 1, BPF_NOEXIST as u64);
        if added.is_ok()
            && let Some(n) = SEEN_CALLBACKS_ADDED.get_ptr_mut(0)
        {
            // SAFETY: this CPU's slot; the probe does not migrate while it runs.
            unsafe { *n += 1 };
        }
        note_insert(dropped::SEEN_CALLBACKS, added);
    }
    0
}

#[uprobe]
pub fn timer_callback(ctx: ProbeContext) -> u32 {
    let (tgid, _) = current_ids();
    let cookie = cookie(&ctx);
    if watched_uprobe_hit(tgid, cookie).is_none() {
        return 0;
    }
    count(&CounterKey {
        tgid,
        kind: kind::TIMER_CALLBACK,
        // The callback's link-time address: the same for every process of one binary.
        id: link_generation::strip(cookie),
    });
    0
}
