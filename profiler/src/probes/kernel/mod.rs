//! Kernel plumbing the probe sources share: per-process uprobes opened by hand, links made all
//! or nothing, the detacher that closes them off the sampling thread, the
//! descriptor tables that hold multi-uprobe links, shared tracepoint groups,
//! the counter store and the watch table (memory-mapped BPF arrays), batched map reads and
//! program statistics.

pub mod batch;
pub mod bpf_call;
pub mod counters;
pub mod detacher;
pub mod link_tables;
pub mod mapped;
pub mod object;
pub mod perf_uprobe;
pub mod prog_info;
pub mod shared_links;
pub mod stats;
#[cfg(test)]
pub mod test_support;
pub mod tracepoint_group;
pub mod uprobe_multi;
pub mod uprobes;
pub mod watch_table;
