//! The little-endian byte codec shared by the commit record and the checkpoint: writers append
//! to a `Vec<u8>`, and a [`Reader`] checks every length against what is left, so decoding
//! hostile bytes fails with a reason and never panics or over-allocates.

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u128(out: &mut Vec<u8>, v: u128) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A name: `len u16 | UTF-8 bytes` (catalog names are at most 128 bytes).
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads fields from a byte slice; every error says what was wanted where.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], at: usize) -> Reader<'a> {
        Reader { bytes, at }
    }

    /// Offset of the next byte to read.
    pub fn at(&self) -> usize {
        self.at
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{n} bytes wanted at offset {} of {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn u128(&mut self) -> Result<u128, String> {
        self.array().map(u128::from_le_bytes)
    }

    pub fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bad flag {other}")),
        }
    }

    pub fn string(&mut self) -> Result<String, String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "name is not UTF-8".into())
    }

    /// A `u64` length of bytes that must all be there.
    pub fn len(&mut self) -> Result<usize, String> {
        let len = self.u64()?;
        usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.remaining())
            .ok_or_else(|| format!("length {len} beyond the end"))
    }

    /// A `u64` count of items of at least `item_bytes` each: bounded by what is left, so a
    /// corrupt count cannot ask for a huge allocation.
    pub fn count(&mut self, item_bytes: usize) -> Result<usize, String> {
        let count = self.u64()?;
        usize::try_from(count)
            .ok()
            .filter(|c| c.saturating_mul(item_bytes) <= self.remaining())
            .ok_or_else(|| format!("count {count} beyond the end"))
    }
}
