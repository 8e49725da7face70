//! What the root tests of the probe layer share: the eBPF object loaded for a test that may
//! attach, and one attaching test at a time.

use aya::Ebpf;

/// Root tests that attach probes run one at a time: these tests count the process's
/// perf-event descriptors, which any other attaching test would change under them.
pub static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn attaching() -> std::sync::MutexGuard<'static, ()> {
    ATTACHING.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn root_ebpf(test: &str) -> Option<Ebpf> {
    xtask::prereq::Prereq::new(test).root()?;
    crate::offer::tracefs::ensure_tracefs().expect("tracefs");
    Some(Ebpf::load(super::object::EBPF_OBJECT).expect("loading the eBPF object"))
}

/// A root test's start: one attaching test at a time, the eBPF object loaded (`None`: skipped,
/// not root; a failure under `PROFILER_E2E_REQUIRE`).
pub fn start_root_test(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Ebpf)> {
    let one_at_a_time = attaching();
    Some((one_at_a_time, root_ebpf(test)?))
}

/// `let (guard, ebpf) = root_test!("name");`: [`start_root_test`], returning from the test when it
/// is skipped.
macro_rules! root_test {
    ($test:expr) => {
        match $crate::probes::kernel::test_support::start_root_test($test) {
            Some(started) => started,
            None => return,
        }
    };
}
pub(crate) use root_test;
