//! Structs that start with `uint32_t struct_size`, so that fields can be added at the end
//! without breaking callers built against an older header.
//!
//! Reading a caller's struct: the library takes only the fields that `struct_size` covers
//! entirely and leaves the rest zero ("default"). A size smaller than the end of the first
//! field after `struct_size` is refused (it is almost always an unset `struct_size`), and so is
//! a larger struct from a newer header unless its extra bytes are all zero (the caller set
//! fields this library does not know) — the rule of Linux's `copy_struct_from_user`.
//! Writing into a caller's struct (metrics) fills only the covered fields.

use crate::error::{Error, Result};

/// Largest `struct_size` accepted; anything larger is taken for garbage.
const MAX_STRUCT_SIZE: usize = 4096;

/// A `#[repr(C)]` struct whose first field is `struct_size: u32`.
pub(crate) trait Versioned: Copy {
    /// The C name, for messages.
    const C_NAME: &'static str;
    /// The value with every field zero or NULL.
    fn zeroed() -> Self;
    /// `(offset, size)` of every field in declaration order, `struct_size` first.
    fn fields() -> Vec<(usize, usize)>;
}

/// `(offset, size)` of the listed fields of `$t`, for [`Versioned::fields`].
macro_rules! field_spans {
    ($t:ty; $($field:ident),+ $(,)?) => {{
        let z = <$t as $crate::ffi::versioned::Versioned>::zeroed();
        vec![$((std::mem::offset_of!($t, $field), std::mem::size_of_val(&z.$field))),+]
    }};
}
pub(crate) use field_spans;

/// The smallest `struct_size` accepted: the end of the first field after `struct_size`.
fn min_size<T: Versioned>() -> usize {
    let fields = T::fields();
    let (offset, size) = fields.get(1).copied().unwrap_or(fields[0]);
    offset + size
}

fn check_size<T: Versioned>(size: usize, name: &str) -> Result<()> {
    let min = min_size::<T>();
    if size < min || size > MAX_STRUCT_SIZE {
        return Err(Error::InvalidArgument(format!(
            "{name}->struct_size is {size}; set it to sizeof({}) = {} (at least {min})",
            T::C_NAME,
            std::mem::size_of::<T>()
        )));
    }
    Ok(())
}

/// The `struct_size` the caller set in `*p`, checked against `T` (see `check_size`).
///
/// # Safety
/// `p` is NULL, or points to a readable `u32` (every versioned struct starts with one).
unsafe fn struct_size<T: Versioned>(p: *const T, name: &str) -> Result<usize> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{name} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument(format!("{name} is not aligned")));
    }
    // SAFETY: non-null and aligned (checked); every T starts with a u32 struct_size.
    let size = unsafe { p.cast::<u32>().read() } as usize;
    check_size::<T>(size, name)?;
    Ok(size)
}

/// Copies the fields of `*p` that its `struct_size` covers over a zeroed `T`.
///
/// # Safety
/// `p` is NULL, or points to at least `struct_size` readable bytes laid out as `T` (the
/// caller's struct, possibly from an older or newer header).
pub(crate) unsafe fn read_versioned<T: Versioned>(p: *const T, name: &str) -> Result<T> {
    // SAFETY: forwarded contract.
    let size = unsafe { struct_size(p, name) }?;
    let base = p.cast::<u8>();
    let known = std::mem::size_of::<T>();
    if size > known {
        // SAFETY: the caller's struct is `size` bytes long (contract), so [known, size) is
        // readable.
        let extra = unsafe { std::slice::from_raw_parts(base.add(known), size - known) };
        if extra.iter().any(|&b| b != 0) {
            return Err(Error::InvalidArgument(format!(
                "{name} is a {size}-byte {} from a newer header with fields set that this \
                 library ({known} bytes) does not know",
                T::C_NAME
            )));
        }
    }
    let mut out = T::zeroed();
    let dst = (&mut out as *mut T).cast::<u8>();
    for (offset, len) in T::fields() {
        if offset + len <= size {
            // SAFETY: the field lies inside both the caller's `size` readable bytes and `out`
            // (offsets come from offset_of! on T); the two objects are distinct.
            unsafe { std::ptr::copy_nonoverlapping(base.add(offset), dst.add(offset), len) };
        }
    }
    Ok(out)
}

/// Writes the fields of `value` (except `struct_size`) that `(*p).struct_size` covers into
/// `*p`, leaving `struct_size` and anything beyond it as they are.
///
/// # Safety
/// `p` is NULL, or points to at least `struct_size` writable bytes laid out as `T`.
pub(crate) unsafe fn write_versioned<T: Versioned>(p: *mut T, value: &T, name: &str) -> Result<()> {
    // SAFETY: forwarded contract.
    let size = unsafe { struct_size(p, name) }?;
    let src = (value as *const T).cast::<u8>();
    let base = p.cast::<u8>();
    for (offset, len) in T::fields().into_iter().skip(1) {
        if offset + len <= size {
            // SAFETY: the field lies inside the caller's `size` writable bytes and inside
            // `value`; the caller's struct is not the Rust value.
            unsafe { std::ptr::copy_nonoverlapping(src.add(offset), base.add(offset), len) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A struct in the shape of the ABI's config structs.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Cfg {
        struct_size: u32,
        a: u32,
        b: u64,
        c: u64,
    }

    impl Versioned for Cfg {
        const C_NAME: &'static str = "cfg_t";
        fn zeroed() -> Self {
            Cfg {
                struct_size: 0,
                a: 0,
                b: 0,
                c: 0,
            }
        }
        fn fields() -> Vec<(usize, usize)> {
            field_spans!(Cfg; struct_size, a, b, c)
        }
    }

    fn full() -> Cfg {
        Cfg {
            struct_size: 24,
            a: 1,
            b: 2,
            c: 3,
        }
    }

    #[test]
    fn a_full_struct_reads_every_field() {
        // SAFETY: a live, aligned Cfg.
        assert_eq!(unsafe { read_versioned(&full(), "cfg") }.unwrap(), full());
    }

    #[test]
    fn an_older_caller_gets_defaults_for_fields_it_does_not_cover() {
        // An "older header" whose struct ended after `b`: c is never read.
        let mut old = full();
        old.struct_size = 16;
        // SAFETY: a live, aligned Cfg (larger than struct_size says).
        let got = unsafe { read_versioned(&old, "cfg") }.unwrap();
        assert_eq!((got.a, got.b, got.c), (1, 2, 0));
        // A size that ends inside `b` covers only `a`: a half-read field would be garbage.
        old.struct_size = 12;
        // SAFETY: as above.
        let got = unsafe { read_versioned(&old, "cfg") }.unwrap();
        assert_eq!((got.a, got.b, got.c), (1, 0, 0));
    }

    #[test]
    fn too_small_sizes_are_refused() {
        for size in [0u32, 1, 4, 7] {
            let mut c = full();
            c.struct_size = size;
            // SAFETY: a live, aligned Cfg.
            let e = unsafe { read_versioned(&c, "cfg") }.unwrap_err();
            assert_eq!(e.code(), 2);
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid argument: cfg->struct_size is {size}; set it to sizeof(cfg_t) = 24 \
                     (at least 8)"
                )
            );
        }
        let mut c = full();
        c.struct_size = 8;
        // SAFETY: a live, aligned Cfg.
        let got = unsafe { read_versioned(&c, "cfg") }.unwrap();
        assert_eq!((got.a, got.b), (1, 0));
    }

    #[test]
    fn a_newer_caller_is_accepted_only_with_its_new_fields_zero() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Newer {
            old: Cfg,
            d: u64,
        }
        let mut n = Newer { old: full(), d: 0 };
        n.old.struct_size = 32;
        let p = (&n as *const Newer).cast::<Cfg>();
        // SAFETY: p points to a 32-byte struct whose first 24 bytes are a Cfg.
        let got = unsafe { read_versioned(p, "cfg") }.unwrap();
        assert_eq!((got.a, got.b, got.c), (1, 2, 3));
        let newer_set = Newer { d: 9, ..n };
        let p = (&newer_set as *const Newer).cast::<Cfg>();
        // SAFETY: as above.
        let e = unsafe { read_versioned(p, "cfg") }.unwrap_err();
        assert!(e.to_string().contains("newer header"), "{e}");
        let mut huge = full();
        huge.struct_size = 1 << 20;
        // SAFETY: refused before anything past the u32 is read.
        assert!(unsafe { read_versioned(&huge, "cfg") }.is_err());
    }

    #[test]
    fn null_is_refused() {
        // SAFETY: NULL is allowed.
        let e = unsafe { read_versioned::<Cfg>(std::ptr::null(), "kv") }.unwrap_err();
        assert_eq!(e.to_string(), "invalid argument: kv is NULL");
    }

    #[test]
    fn writes_fill_only_covered_fields() {
        let value = Cfg {
            struct_size: 999,
            a: 7,
            b: 8,
            c: 9,
        };
        let mut out = Cfg {
            struct_size: 16,
            a: 0xAA,
            b: 0xBB,
            c: 0xCC,
        };
        // SAFETY: a live, aligned Cfg.
        unsafe { write_versioned(&mut out, &value, "out") }.unwrap();
        assert_eq!(
            out,
            Cfg {
                struct_size: 16,
                a: 7,
                b: 8,
                c: 0xCC
            }
        );
        out.struct_size = 0;
        // SAFETY: as above.
        assert!(unsafe { write_versioned(&mut out, &value, "out") }.is_err());
        assert_eq!(out.a, 7, "nothing written on failure");
    }
}
