//! Ctrl-C for long-running tools (demo, benchmarks): the first SIGINT only raises a flag, so the tool
//! can stop at its next check and let every guard (daemon, servers, namespaces) clean up; a second
//! one kills as usual (leftovers are then for [`crate::cleanup_namespaces`]).

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic store.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT handler (once per process is enough; repeating is harmless).
pub fn catch_sigint() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler, an empty mask and plain flags is well-formed;
    // the handler only stores to an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SA_RESETHAND: the second Ctrl-C gets the default action. No SA_RESTART: a blocking call
        // returns EINTR, so the tool notices promptly.
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT arrived since [`catch_sigint`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error if SIGINT arrived: `?` it between steps.
pub fn check() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
