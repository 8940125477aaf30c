//! A bounds-checked cursor over bytes from a peer, and the length checks and saturating
//! casts the codecs share.

use super::*;

/// Cursor over bytes from a peer; every read checks the remaining length first.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], WireError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(WireError::Truncated {
                what,
                needed: N,
                got: self.rest.len(),
            }),
        }
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_le_bytes)
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(WireError::Truncated {
                what,
                needed: n,
                got: self.rest.len(),
            }),
        }
    }

    /// Checks that `count` items of at least `min_len` bytes each can still fit, so a
    /// count announced by a peer never sizes an allocation beyond the input it sent.
    pub(crate) fn require_items(
        &self,
        count: usize,
        min_len: usize,
        what: &'static str,
    ) -> Result<(), WireError> {
        let needed = count.saturating_mul(min_len);
        if needed > self.remaining() {
            return Err(WireError::Truncated {
                what,
                needed,
                got: self.remaining(),
            });
        }
        Ok(())
    }

    pub(crate) fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what,
                count: self.rest.len(),
            })
        }
    }
}

pub(crate) fn check_max(what: &'static str, len: u64, max: u64) -> Result<(), WireError> {
    if len > max {
        Err(WireError::TooLarge { what, len, max })
    } else {
        Ok(())
    }
}

pub(super) fn saturate_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

pub(super) fn saturate_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
