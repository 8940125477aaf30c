//! The panic boundary and the calling thread's last error message.
//!
//! Every `extern "C"` body that can fail runs inside [`guard`] (or [`guard_noting`]): it turns
//! `Ok` into [`KVT_OK`], an [`Error`] into its negated code, a panic into
//! [`KVT_ERR_PANIC`](super::KVT_ERR_PANIC),
//! and leaves the matching message for `kvt_last_error_message`.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::KVT_OK;
use crate::error::{Error, Result};

thread_local! {
    /// The message of the last `kvt_*` call on this thread ("" after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs `body` behind the panic boundary and returns its status.
pub(crate) fn guard(body: impl FnOnce() -> Result<()>) -> i32 {
    guard_noting(|| body().map(|()| None))
}

/// Like [`guard`], but a body that succeeds may leave a note as the last message (why a
/// polled batch or room failed, which is a successful poll).
pub(crate) fn guard_noting(body: impl FnOnce() -> Result<Option<String>>) -> i32 {
    // AssertUnwindSafe: after a panic the caller gets KVT_ERR_PANIC and is told to destroy
    // the handle involved; nothing here reuses state the body may have left half-updated.
    let outcome = catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|payload| Err(Error::Panic(panic_message(payload.as_ref()))));
    match outcome {
        Ok(note) => {
            set_last_error(note.as_deref().unwrap_or(""));
            KVT_OK
        }
        Err(e) => {
            set_last_error(&e.to_string());
            -e.code()
        }
    }
}

/// The text of a panic payload (`panic!` with a message gives `&str` or `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Replaces this thread's message. Interior NULs (which C could not see past) become `\0`.
pub(crate) fn set_last_error(msg: &str) {
    let _ = LAST_ERROR.try_with(|cell| {
        let mut cur = cell.borrow_mut();
        if cur.as_bytes() == msg.as_bytes() {
            return;
        }
        let text = CString::new(msg)
            .unwrap_or_else(|_| CString::new(msg.replace('\0', "\\0")).unwrap_or_default());
        *cur = text;
    });
}

/// This thread's message, valid until the next `set_last_error` on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|cell| cell.borrow().as_ptr())
        // The thread-local is gone only while the thread exits; give a static "" then.
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::KVT_ERR_PANIC;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: the pointer is valid until the next set_last_error on this thread, and
        // nothing runs in between.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn ok_clears_the_message() {
        set_last_error("old failure");
        assert_eq!(guard(|| Ok(())), KVT_OK);
        assert_eq!(last(), "");
    }

    #[test]
    fn errors_return_their_negated_code_and_message() {
        let status = guard(|| Err(Error::UnknownPeer { peer: 7 }));
        assert_eq!(status, -9);
        assert_eq!(last(), "unknown peer 7");
        // The message stays until the next call, then a success clears it.
        assert_eq!(last(), "unknown peer 7");
        assert_eq!(guard(|| Ok(())), 0);
        assert_eq!(last(), "");
    }

    #[test]
    fn a_panic_is_caught_with_its_message() {
        let status = guard(|| panic!("boom {}", 42));
        assert_eq!(status, KVT_ERR_PANIC);
        assert_eq!(last(), "internal panic: boom 42");
        let status = guard(|| panic!("static str"));
        assert_eq!(status, KVT_ERR_PANIC);
        assert_eq!(last(), "internal panic: static str");
        let status = guard(|| std::panic::panic_any(17u32));
        assert_eq!(status, KVT_ERR_PANIC);
        assert_eq!(last(), "internal panic: a panic with a non-string payload");
        // The boundary still works after a panic.
        assert_eq!(guard(|| Ok(())), KVT_OK);
        assert_eq!(last(), "");
    }

    #[test]
    fn a_panic_inside_nested_code_is_caught() {
        fn deep(n: u32) -> Result<()> {
            if n == 0 {
                let v: Vec<u8> = Vec::new();
                // An out-of-bounds index: a panic the body did not write itself.
                let _ = v[usize::from(v.is_empty())];
                Ok(())
            } else {
                deep(n - 1)
            }
        }
        assert_eq!(guard(|| deep(5)), KVT_ERR_PANIC);
        assert!(last().contains("index out of bounds"), "{}", last());
    }

    #[test]
    fn a_note_is_left_on_success() {
        assert_eq!(guard_noting(|| Ok(Some("batch 3 failed".into()))), KVT_OK);
        assert_eq!(last(), "batch 3 failed");
        assert_eq!(guard_noting(|| Ok(None)), KVT_OK);
        assert_eq!(last(), "");
    }

    #[test]
    fn interior_nuls_do_not_cut_the_message() {
        assert_eq!(guard(|| Err(Error::InvalidArgument("a\0b".into()))), -2);
        assert_eq!(last(), "invalid argument: a\\0b");
    }

    #[test]
    fn messages_are_per_thread() {
        assert_eq!(guard(|| Err(Error::Shutdown)), -18);
        let other = std::thread::spawn(|| {
            let before = last();
            assert_eq!(guard(|| Err(Error::UnknownBatch { batch: 1 })), -10);
            (before, last())
        })
        .join()
        .unwrap();
        assert_eq!(other, (String::new(), "unknown batch 1".to_string()));
        assert_eq!(last(), "engine is shut down");
    }

    #[test]
    fn the_pointer_is_stable_until_the_next_call() {
        assert_eq!(guard(|| Err(Error::Shutdown)), -18);
        let p = last_error_ptr();
        assert_eq!(last_error_ptr(), p, "reading does not reallocate");
        // SAFETY: no kvt_ call ran since p was taken.
        let text = unsafe { CStr::from_ptr(p) };
        assert_eq!(text.to_bytes(), b"engine is shut down");
    }
}
