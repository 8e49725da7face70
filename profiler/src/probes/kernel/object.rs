//! The compiled eBPF object (built by `profiler/build.rs` through aya-build and embedded), and
//! loading one of its tracepoint programs onto its tracepoint.

use anyhow::Context as _;
use aya::Ebpf;

/// The compiled eBPF object, embedded at build time by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Runs `load` with this thread's signals blocked, and again if the verifier still stopped
/// for one (`EAGAIN`, as libbpf retries): the verifier gives up on a pending signal, and the
/// runtime's handlers (SIGCHLD, SIGTERM) make signals come at any time.
pub fn retry_interrupted<T, E>(
    mut load: impl FnMut() -> Result<T, E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let _blocked = BlockedSignals::new();
    let mut attempts = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && attempts < 5 => attempts += 1,
            outcome => return outcome,
        }
    }
}

/// Whether aya's load failed because the verifier stopped for a signal.
pub fn load_interrupted(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::LoadError { io_error, .. }
        if io_error.raw_os_error() == Some(libc::EAGAIN))
}

/// Every signal blocked on this thread until dropped; process-directed ones go to another
/// thread meanwhile, or wait.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data, filled by sigfillset; pthread_sigmask writes `old`.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            Self(old)
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Loads the tracepoint program `name` and attaches it to `category:name`.
pub fn attach_tracepoint(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<()> {
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?;
    retry_interrupted(|| program.load(), load_interrupted)
        .with_context(|| format!("loading eBPF program {name}"))?;
    program
        .attach(category, name)
        .with_context(|| format!("attaching to tracepoint {category}:{name}"))?;
    Ok(())
}
