//! Reading a frame's payload field by field, for both wire protocols (`proto::frame` between
//! nodes, `client::proto` for clients): every length is checked against what is left before a
//! byte is looked at, and every failure is `Error::Malformed` naming the frame. Each protocol
//! adds its own fields (strings, options, flags) in an `impl Reader` of its own module.

use crate::error::{Error, Result};

/// Reads the fields of one payload.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    frame: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over the payload `bytes` of a `frame` frame (the name goes into errors).
    pub(crate) fn new(bytes: &'a [u8], frame: &'static str) -> Reader<'a> {
        Reader {
            bytes,
            at: 0,
            frame,
        }
    }

    /// [`Reader::new`] over `bytes`, which must hold at least `fixed_bytes` (the payload's fixed
    /// part).
    pub(crate) fn at_least(
        bytes: &'a [u8],
        frame: &'static str,
        fixed_bytes: usize,
    ) -> Result<Reader<'a>> {
        let r = Reader::new(bytes, frame);
        if bytes.len() < fixed_bytes {
            return Err(r.malformed(format!(
                "payload of {} bytes, at least {fixed_bytes} needed",
                bytes.len()
            )));
        }
        Ok(r)
    }

    pub(crate) fn malformed(&self, reason: String) -> Error {
        Error::Malformed {
            frame: self.frame,
            reason,
        }
    }

    /// Bytes not read yet.
    pub(crate) fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            _ => Err(self.malformed(format!(
                "{n} bytes wanted at offset {} of a {}-byte payload",
                self.at,
                self.bytes.len()
            ))),
        }
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.at..];
        self.at = self.bytes.len();
        rest
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Fails unless the whole payload was read.
    pub(crate) fn end(&self) -> Result<()> {
        if self.left() != 0 {
            return Err(self.malformed(format!(
                "{} bytes left over after the last field",
                self.left()
            )));
        }
        Ok(())
    }
}
