//! SIGPIPE for C programs.
//!
//! Writing to a socket whose peer has gone raises SIGPIPE, and its default action kills the
//! process. Rust and Python programs set it to "ignore" at start-up, so the write just fails
//! with `EPIPE` and the engine reports `PeerLost`; a C program starts with the default, so a
//! decode server would die with its prefill peer. The first engine or KV manager created
//! through the C ABI therefore sets SIGPIPE to ignore, but only while it is still at the
//! default: a handler the program installed itself is left alone.

use std::sync::Once;

/// Ignores SIGPIPE if it is at its default action (once per process).
pub(crate) fn ignore_default_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = ignore_if_default(libc::SIGPIPE) {
            tracing::warn!("cannot set SIGPIPE to ignore: {e}");
        }
    });
}

/// Sets `signal` to SIG_IGN when its action is SIG_DFL; returns whether it did.
fn ignore_if_default(signal: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: sigaction is plain data; all-zero is a valid value (no handler, empty mask).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a NULL new action only reads the current one into `old`, a valid out-pointer.
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return Ok(false);
    }
    // SAFETY: as above.
    let mut ignore: libc::sigaction = unsafe { std::mem::zeroed() };
    ignore.sa_sigaction = libc::SIG_IGN;
    // SAFETY: SIG_IGN installs no code to run; both pointers are valid for the call.
    if unsafe { libc::sigaction(signal, &ignore, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(signal: libc::c_int) -> libc::sighandler_t {
        // SAFETY: as in ignore_if_default.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: query only (NULL new action); old is a valid out-pointer.
        let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0);
        old.sa_sigaction
    }

    /// SIGURG (default: ignore, so nothing happens if it arrives) stands in for SIGPIPE,
    /// which the Rust test harness already ignores.
    #[test]
    fn only_the_default_action_is_replaced() {
        let sig = libc::SIGURG;
        assert_eq!(action(sig), libc::SIG_DFL);
        assert!(ignore_if_default(sig).unwrap());
        assert_eq!(action(sig), libc::SIG_IGN);
        // Now not at the default any more: left alone.
        assert!(!ignore_if_default(sig).unwrap());
        assert_eq!(action(sig), libc::SIG_IGN);
        // SAFETY: restores the default action; nothing in this test process relies on SIGURG.
        let restored = unsafe { libc::signal(sig, libc::SIG_DFL) };
        assert_eq!(restored, libc::SIG_IGN);
        // Rust programs (this test harness included) already ignore SIGPIPE.
        ignore_default_sigpipe();
        assert_eq!(action(libc::SIGPIPE), libc::SIG_IGN);
    }
}
