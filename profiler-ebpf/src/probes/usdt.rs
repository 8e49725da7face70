//! Guest reads/writes of emulated devices from QEMU's USDT probes
//! `qemu:memory_region_ops_read` / `qemu:memory_region_ops_write`
//! `(int cpu_index, void *mr, u64 addr, u64 value, unsigned size, const char *name)`.
//!
//! Userspace attaches this program at every probe site with a BPF cookie that indexes
//! `USDT_SPECS`, which says where each argument lives (the argument spec of the note,
//! decoded like libbpf's `usdt.bpf.h`). Counters are keyed by the `MemoryRegion` pointer;
//! the region's name is read from user memory only the first time a region is seen.
//!
//! The hot path is one map lookup: where the region argument is a whole register (QEMU's
//! builds), the cookie itself carries the counter kind and the register
//! ([`profiler_common::usdt_cookie`]), and the spec is read only for a region's first event.
//! The uprobe is scoped to the watched process and detached when it is unwatched, so the
//! program does not look the process up again, unless an overhead budget duty-cycles the
//! process (its links then carry a [`profiler_common::link_generation`]).

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_attach_cookie, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, uprobe},
    maps::HashMap,
    programs::ProbeContext,
};
use profiler_common::{
    CounterKey, MAX_USDT_SPECS, REGION_NAME_LEN, RegionKey, RegionName, USDT_MAX_ARGS, UsdtArgSpec,
    UsdtSpec, dropped, usdt_arg, usdt_cookie,
};

use crate::maps::{
    REGION_NAMES, add_new, atomic_add, counter, current_ids, note_insert, read_write_link_counts,
};

/// Cookie -> argument layout of one attached USDT site.
#[map]
pub static USDT_SPECS: HashMap<u32, UsdtSpec> = HashMap::with_max_entries(MAX_USDT_SPECS, 0);

#[inline(always)]
fn fetch_arg(ctx: &ProbeContext, spec: &UsdtArgSpec) -> Option<u64> {
    let raw: u64 = match spec.arg_type {
        usdt_arg::CONST => spec.val_off,
        usdt_arg::REG | usdt_arg::REG_DEREF => {
            if spec.reg_off as usize > 160 {
                return None;
            }
            // SAFETY: reads within the kernel's pt_regs of this probe hit.
            let reg = unsafe {
                bpf_probe_read_kernel(
                    (ctx.as_ptr() as *const u8).add(spec.reg_off as usize) as *const u64
                )
            }
            .ok()?;
            if spec.arg_type == usdt_arg::REG {
                reg
            } else {
                // SAFETY: bpf_probe_read_user checks the user address.
                unsafe { bpf_probe_read_user(reg.wrapping_add(spec.val_off) as *const u64) }.ok()?
            }
        }
        usdt_arg::ABS_DEREF => {
            // SAFETY: as above.
            unsafe { bpf_probe_read_user(spec.val_off as *const u64) }.ok()?
        }
        _ => return None,
    };
    let shift = (spec.bitshift & 63) as u32;
    let value = if spec.signed != 0 {
        (((raw << shift) as i64) >> shift) as u64
    } else {
        (raw << shift) >> shift
    };
    Some(value)
}

#[uprobe]
pub fn usdt_memory_region_ops(ctx: ProbeContext) -> u32 {
    // SAFETY: the helper only reads the attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (tgid, _) = current_ids();
    if !read_write_link_counts(tgid, cookie) {
        return 0;
    }
    let (kind, region) = match usdt_cookie::fast(cookie) {
        Some((kind, reg_off)) => {
            // SAFETY: reads within the kernel's pt_regs of this probe hit (offset < 168).
            let Ok(region) = (unsafe {
                bpf_probe_read_kernel(
                    (ctx.as_ptr() as *const u8).add(reg_off as usize & 0xff) as *const u64
                )
            }) else {
                return 0;
            };
            (kind, region)
        }
        None => {
            // SAFETY: the spec is copied out of the map.
            let Some(spec) = (unsafe { USDT_SPECS.get(usdt_cookie::id(cookie)) }).copied() else {
                return 0;
            };
            let region_idx = spec.region_arg as usize;
            if region_idx >= USDT_MAX_ARGS {
                return 0;
            }
            let Some(region) = fetch_arg(&ctx, &spec.args[region_idx]) else {
                return 0;
            };
            (spec.kind, region)
        }
    };
    let key = CounterKey {
        tgid,
        kind,
        id: region,
    };
    match counter(&key) {
        Some(value) => atomic_add(value, 1),
        None => {
            // A region's first event: its name, then its counter.
            // SAFETY: the spec is copied out of the map.
            if let Some(spec) = (unsafe { USDT_SPECS.get(usdt_cookie::id(cookie)) }).copied() {
                remember_name(&ctx, &spec, tgid, region);
            }
            add_new(&key, 1);
        }
    }
    0
}

/// Reads the region's name the first time this process touches the region.
#[inline(never)]
fn remember_name(ctx: &ProbeContext, spec: &UsdtSpec, tgid: u32, region: u64) {
    let name_key = RegionKey {
        tgid,
        _pad: 0,
        region,
    };
    // SAFETY: presence check only.
    if unsafe { REGION_NAMES.get(name_key) }.is_some() {
        return;
    }
    let name_idx = spec.name_arg as usize;
    if name_idx >= USDT_MAX_ARGS {
        return;
    }
    let Some(name_ptr) = fetch_arg(ctx, &spec.args[name_idx]) else {
        return;
    };
    let mut name = RegionName {
        name: [0; REGION_NAME_LEN],
    };
    // SAFETY: bpf_probe_read_user_str_bytes checks the user address and bounds the copy.
    if unsafe { bpf_probe_read_user_str_bytes(name_ptr as *const u8, &mut name.name) }.is_ok() {
        note_insert(
            dropped::REGION_NAMES,
            REGION_NAMES.insert(name_key, name, 0),
        );
    }
}
