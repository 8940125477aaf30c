//! Checked conversions of C arguments: handles, out-parameters, strings, arrays and string
//! out-buffers. Each refuses NULL (and misaligned) pointers with `InvalidArgument` naming the
//! parameter, so no `extern "C"` function dereferences a raw pointer itself.

use std::ffi::{CStr, c_char};
use std::mem::MaybeUninit;

use crate::error::{Error, Result};

fn null(name: &str) -> Error {
    Error::InvalidArgument(format!("{name} is NULL"))
}

fn check_ptr<T>(p: *const T, name: &str) -> Result<()> {
    if p.is_null() {
        return Err(null(name));
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument(format!(
            "{name} ({p:p}) is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// The object behind a handle or input pointer.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing mutates for `'a`.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    check_ptr(p, name)?;
    // SAFETY: non-null and aligned (checked); live and unaliased by the caller's contract.
    Ok(unsafe { &*p })
}

/// An out-parameter, to be written (only) once the call has succeeded.
///
/// # Safety
/// `p` is NULL or valid for writing a `T` for `'a`.
pub(crate) unsafe fn out_param<'a, T>(p: *mut T, name: &str) -> Result<&'a mut MaybeUninit<T>> {
    check_ptr(p, name)?;
    // SAFETY: non-null and aligned (checked), writable by the caller's contract;
    // MaybeUninit<T> has T's layout and never reads the old value.
    Ok(unsafe { &mut *p.cast::<MaybeUninit<T>>() })
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays unchanged for `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    // SAFETY: forwarded contract.
    unsafe { opt_c_str(p, name) }?.ok_or_else(|| null(name))
}

/// An optional NUL-terminated UTF-8 string: NULL gives `None`.
///
/// # Safety
/// As for [`c_str`].
pub(crate) unsafe fn opt_c_str<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; NUL-terminated and unchanged for 'a by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("{name} is not UTF-8: {e}")))
}

/// Refuses `n` elements of `T` whose size does not fit `isize` (what a slice may span).
fn check_count<T>(n: usize, name: &str) -> Result<()> {
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(Error::InvalidArgument(format!(
            "{name}: {n} elements do not fit in memory"
        )));
    }
    Ok(())
}

/// `n` elements at `p`; with `n == 0`, `p` may be NULL.
///
/// # Safety
/// When `n > 0`, `p` is NULL or points to `n` initialized `T`s unchanged for `'a`.
pub(crate) unsafe fn c_slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    check_ptr(p, name)?;
    check_count::<T>(n, name)?;
    // SAFETY: non-null, aligned, and a size that fits isize (checked); n initialized
    // elements that stay unchanged for 'a by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// `n` writable, possibly uninitialised elements at `p`; with `n == 0`, `p` may be NULL.
///
/// # Safety
/// When `n > 0`, `p` is NULL or valid for writing `n` `T`s, with no other reference to them
/// for `'a`.
pub(crate) unsafe fn out_slice<'a, T>(
    p: *mut T,
    n: usize,
    name: &str,
) -> Result<&'a mut [MaybeUninit<T>]> {
    if n == 0 {
        return Ok(&mut []);
    }
    check_ptr(p, name)?;
    check_count::<T>(n, name)?;
    // SAFETY: non-null, aligned, a size that fits isize (checked), writable and unaliased for
    // 'a by the caller's contract; MaybeUninit needs no initialised contents.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<MaybeUninit<T>>(), n) })
}

/// Copies `s` and a terminating NUL into `buf` of `cap` bytes. Nothing is truncated: when
/// `cap < s.len() + 1` nothing is written and the error names the size needed.
///
/// # Safety
/// `buf` is NULL or valid for writing `cap` bytes.
pub(crate) unsafe fn write_c_str(buf: *mut c_char, cap: usize, s: &str, name: &str) -> Result<()> {
    if buf.is_null() {
        return Err(null(name));
    }
    let bytes = s.as_bytes();
    if bytes.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{name}: the text holds a NUL byte"
        )));
    }
    let need = bytes.len() + 1;
    if cap < need {
        return Err(Error::InvalidArgument(format!(
            "{name}: {cap} bytes cannot hold {} bytes and the NUL; pass at least {need}",
            bytes.len()
        )));
    }
    // SAFETY: buf is non-null and writable for cap >= need bytes (the caller's contract);
    // bytes is a separate Rust allocation, so the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(())
}

/// Moves `value` to the heap and gives C the pointer (its handle).
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes back a handle made by [`into_handle`], or `None` for NULL.
///
/// # Safety
/// `p` is NULL or came from `into_handle::<T>` and has not been taken back before; no other
/// thread uses it.
pub(crate) unsafe fn take_handle<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: by the contract p came from Box::into_raw and is taken back exactly once.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<impl Sized>) -> i32 {
        r.err().map_or(0, |e| e.code())
    }

    #[test]
    fn null_pointers_are_invalid_arguments_naming_the_parameter() {
        // SAFETY: NULL is allowed by every helper's contract.
        unsafe {
            let e = arg_ref::<u64>(std::ptr::null(), "e").unwrap_err();
            assert_eq!(e.to_string(), "invalid argument: e is NULL");
            assert_eq!(e.code(), 2);
            assert_eq!(
                code(out_param::<u32>(std::ptr::null_mut(), "out_segment")),
                2
            );
            assert_eq!(code(c_str(std::ptr::null(), "addr")), 2);
            assert!(opt_c_str(std::ptr::null(), "listen").unwrap().is_none());
            assert_eq!(code(c_slice::<i32>(std::ptr::null(), 3, "pages")), 2);
            assert!(
                c_slice::<i32>(std::ptr::null(), 0, "pages")
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn misaligned_pointers_are_refused() {
        let words = [0u64; 2];
        let odd = (words.as_ptr() as usize + 1) as *const u64;
        // SAFETY: the helper checks alignment before it dereferences.
        let e = unsafe { arg_ref(odd, "reqs") }.unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("not aligned to 8 bytes"), "{e}");
    }

    #[test]
    fn strings_must_be_utf8() {
        let bad = [0xffu8 as c_char, 0];
        // SAFETY: a NUL-terminated array.
        let e = unsafe { c_str(bad.as_ptr(), "addr") }.unwrap_err();
        assert!(e.to_string().contains("addr is not UTF-8"), "{e}");
        // SAFETY: a NUL-terminated literal.
        let ok = unsafe { c_str(c"127.0.0.1:1".as_ptr(), "addr") };
        assert_eq!(ok.unwrap(), "127.0.0.1:1");
    }

    #[test]
    fn slices_whose_size_overflows_are_refused() {
        let x = 0u64;
        // SAFETY: the helper refuses the length before it builds a slice.
        let e = unsafe { c_slice(&x as *const u64, usize::MAX / 4, "src") }.unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }

    /// The out-buffer rules: the text and its NUL must fit, nothing is ever truncated, and a
    /// buffer that is too small is left untouched.
    #[test]
    fn string_out_buffer_never_truncates() {
        /// Writes into `buf` claiming capacity `cap` (never more than it has).
        fn put(buf: &mut [c_char; 8], cap: usize, s: &str) -> Result<()> {
            assert!(cap <= buf.len());
            // SAFETY: buf is writable for 8 >= cap bytes.
            unsafe { write_c_str(buf.as_mut_ptr(), cap, s, "buf") }
        }
        let fresh = || [b'#' as c_char; 8];
        let bytes = |b: [c_char; 8]| b.map(|c| c as u8);
        // Exactly enough: 7 bytes + NUL.
        let mut buf = fresh();
        put(&mut buf, 8, "1234567").unwrap();
        assert_eq!(bytes(buf), *b"1234567\0");
        // One byte short: refused, buffer unchanged, message names the size needed.
        let mut buf = fresh();
        let e = put(&mut buf, 8, "12345678").unwrap_err();
        assert_eq!(e.code(), 2);
        assert_eq!(
            e.to_string(),
            "invalid argument: buf: 8 bytes cannot hold 8 bytes and the NUL; pass at least 9"
        );
        assert_eq!(bytes(buf), [b'#'; 8]);
        // The empty string needs one byte; zero capacity is too small even for it.
        put(&mut buf, 1, "").unwrap();
        assert_eq!(bytes(buf), *b"\0#######", "nothing past the NUL is written");
        assert_eq!(code(put(&mut buf, 0, "")), 2);
        // A capacity larger than needed writes only the text and its NUL.
        let mut buf = fresh();
        put(&mut buf, 8, "ab").unwrap();
        assert_eq!(bytes(buf), *b"ab\0#####");
        // Text with a NUL inside is refused, and so is a NULL buffer.
        assert_eq!(code(put(&mut buf, 8, "a\0b")), 2);
        // SAFETY: NULL is refused before anything is written.
        let e = unsafe { write_c_str(std::ptr::null_mut(), 8, "a", "buf") }.unwrap_err();
        assert_eq!(e.to_string(), "invalid argument: buf is NULL");
    }

    #[test]
    fn handles_round_trip() {
        let h = into_handle(String::from("engine"));
        // SAFETY: h came from into_handle and is taken back once.
        let back = unsafe { take_handle(h) }.unwrap();
        assert_eq!(*back, "engine");
        // SAFETY: NULL is allowed.
        assert!(unsafe { take_handle::<String>(std::ptr::null_mut()) }.is_none());
    }
}
