//! The compiled eBPF object (built by `profiler/build.rs` through aya-build and embedded), and
//! loading one of its tracepoint programs onto its tracepoint.

use anyhow::Context as _;
use aya::Ebpf;

/// The compiled eBPF object, embedded at build time by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Loads the tracepoint program `name` and attaches it to `category:name`.
pub fn attach_tracepoint(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<()> {
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading eBPF program {name}"))?;
    program
        .attach(category, name)
        .with_context(|| format!("attaching to tracepoint {category}:{name}"))?;
    Ok(())
}
