//! KVM guest PIO / MMIO accesses, symbol-free, from the `kvm:` tracepoints.
//!
//! These fire in QEMU's vCPU threads (inside `KVM_RUN`), so the current tgid is the QEMU
//! process. Each program decodes its record into a [`KvmEvent`] and hands it, with the
//! maps as its store, to `profiler_common::kvm::handle`: the same function the tests replay
//! event sequences through (`profiler_common::kvm::replay`), so this file only decodes
//! records and says where the state and the counters live. The kernel
//! facts behind the state machine are in `profiler-common/src/kvm.rs`.
//!
//! Field offsets come from `KVM_FIELDS`, which userspace fills from tracefs `format` files:
//! the layouts of these tracepoints are not ABI.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{Array, LruHashMap},
    programs::TracePointContext,
};
use profiler_common::{
    CounterKey, kind,
    kvm::{
        KvmEvent, KvmField, KvmFieldOffsets, KvmStore, KvmThreadState, MAX_KVM_PORTS,
        MAX_KVM_THREADS, PortKey, handle, port_class,
    },
    kvm_exit_id,
};

use crate::maps::{add, current_ids, is_watched};

/// Index 0: the tracepoint field layout, written once by userspace before attaching.
#[map]
pub static KVM_FIELDS: Array<KvmFieldOffsets> = Array::with_max_entries(1, 0);

/// vCPU thread id -> pending-access state (LRU, so exited threads' entries age out).
#[map]
pub static KVM_THREADS: LruHashMap<u32, KvmThreadState> =
    LruHashMap::with_max_entries(MAX_KVM_THREADS, 0);

/// (process, port, direction) -> `port_class`: who handled that port in that VM, learned from
/// unambiguous events, to resolve the one ambiguous sequence (`out W; IO exit; in Y`).
#[map]
pub static KVM_PORTS: LruHashMap<PortKey, u32> = LruHashMap::with_max_entries(MAX_KVM_PORTS, 0);

/// Reads one field of the tracepoint record, widened to 64 bits.
#[inline(always)]
fn field(ctx: &TracePointContext, f: KvmField) -> Option<u64> {
    let off = f.offset as usize;
    // SAFETY: read_at goes through bpf_probe_read_kernel; offset and size come from the
    // tracepoint's own format description.
    let value = unsafe {
        match f.size {
            1 => {
                let v = ctx.read_at::<u8>(off).ok()?;
                if f.signed != 0 {
                    v as i8 as i64 as u64
                } else {
                    v as u64
                }
            }
            2 => {
                let v = ctx.read_at::<u16>(off).ok()?;
                if f.signed != 0 {
                    v as i16 as i64 as u64
                } else {
                    v as u64
                }
            }
            4 => {
                let v = ctx.read_at::<u32>(off).ok()?;
                if f.signed != 0 {
                    v as i32 as i64 as u64
                } else {
                    v as u64
                }
            }
            8 => ctx.read_at::<u64>(off).ok()?,
            _ => return None,
        }
    };
    Some(value)
}

/// The field layout, once userspace has written it.
#[inline(always)]
fn fields() -> Option<&'static KvmFieldOffsets> {
    let offsets = KVM_FIELDS.get(0)?;
    if offsets.configured == 0 {
        return None;
    }
    Some(offsets)
}

/// The eBPF maps as the state machine's store.
struct Maps;

impl KvmStore for Maps {
    #[inline(always)]
    fn thread(&self, tid: u32) -> Option<KvmThreadState> {
        // SAFETY: the value is copied out at once; only this thread touches its entry.
        unsafe { KVM_THREADS.get(tid) }.copied()
    }
    #[inline(always)]
    fn put_thread(&mut self, tid: u32, state: KvmThreadState) {
        let _ = KVM_THREADS.insert(tid, state, 0);
    }
    #[inline(always)]
    fn drop_thread(&mut self, tid: u32) {
        let _ = KVM_THREADS.remove(tid);
    }
    #[inline(always)]
    fn port_class(&self, key: PortKey) -> u32 {
        // SAFETY: the value is copied out at once.
        match unsafe { KVM_PORTS.get(key) } {
            Some(class) => *class,
            None => port_class::UNKNOWN,
        }
    }
    #[inline(always)]
    fn learn_port(&mut self, key: PortKey, class: u32) {
        let _ = KVM_PORTS.insert(key, class, 0);
    }
    #[inline(always)]
    fn count(&mut self, key: CounterKey, n: u64) {
        add(&key, n);
    }
}

/// Runs one event through the thread's state machine: `profiler_common::kvm::handle`, the
/// code the tests replay.
#[inline(always)]
fn on_event(tgid: u32, tid: u32, event: KvmEvent) -> u32 {
    handle(&mut Maps, tgid, tid, event);
    0
}

#[tracepoint]
pub fn kvm_pio(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    // One field at a time with an early return: a tuple of two `Option`s lets LLVM spill the
    // undefined payload of a `None`, which the verifier rejects (`R3 !read_ok`).
    let Some(rw) = field(&ctx, f.pio_rw) else {
        return 0;
    };
    let Some(port) = field(&ctx, f.pio_port) else {
        return 0;
    };
    let Some(count) = field(&ctx, f.pio_count) else {
        return 0;
    };
    on_event(
        tgid,
        tid,
        KvmEvent::Pio {
            write: rw != 0,
            port,
            count: count as u32,
        },
    )
}

#[tracepoint]
pub fn kvm_mmio(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    let Some(ty) = field(&ctx, f.mmio_type) else {
        return 0;
    };
    let Some(gpa) = field(&ctx, f.mmio_gpa) else {
        return 0;
    };
    on_event(tgid, tid, KvmEvent::Mmio { ty: ty as u32, gpa })
}

#[tracepoint]
pub fn kvm_fast_mmio(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    let Some(gpa) = field(&ctx, f.fast_mmio_gpa) else {
        return 0;
    };
    on_event(tgid, tid, KvmEvent::FastMmio { gpa })
}

#[tracepoint]
pub fn kvm_userspace_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    let Some(reason) = field(&ctx, f.exit_reason) else {
        return 0;
    };
    let Some(errno) = field(&ctx, f.exit_errno) else {
        return 0;
    };
    on_event(
        tgid,
        tid,
        KvmEvent::Exit {
            reason: reason as u32,
            errno: errno as i64,
        },
    )
}

/// A vCPU thread's halt ended: woken after sleeping (the guest's own timer, an interrupt), or
/// while KVM still polled. Fires in the vCPU thread, so the tgid is the QEMU process.
#[tracepoint]
pub fn kvm_vcpu_wakeup(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    let Some(waited) = field(&ctx, f.wakeup_waited) else {
        return 0;
    };
    let kind = if waited != 0 {
        kind::VCPU_WAKEUP
    } else {
        kind::VCPU_HALT_POLL
    };
    add(&CounterKey { tgid, kind, id: 0 }, 1);
    0
}

/// A VM exit, by reason (VMX and SVM fire it; some KVM implementations, PVM among them, do
/// not).
#[tracepoint]
pub fn kvm_exit(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if !is_watched(tgid) {
        return 0;
    }
    let Some(f) = fields() else { return 0 };
    let Some(reason) = field(&ctx, f.vm_exit_reason) else {
        return 0;
    };
    let Some(isa) = field(&ctx, f.vm_exit_isa) else {
        return 0;
    };
    let id = kvm_exit_id(isa as u32, reason as u32);
    add(
        &CounterKey {
            tgid,
            kind: kind::KVM_EXIT,
            id,
        },
        1,
    );
    0
}
