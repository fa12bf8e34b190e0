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

/// A decoder keeps a buffer of at most this capacity between frames; a larger one (left by a
/// large frame) is freed, so an idle connection holds little memory.
pub(crate) const DECODER_IDLE_CAPACITY_BYTES_MAX: usize = 64 * 1024;

/// The framing both protocols' stream decoders share: cuts a byte stream that arrives in
/// arbitrary chunks into whole frames, each a header of fixed size that gives the frame's size,
/// then the rest.
///
/// It buffers at most one frame; a frame that arrives whole in one chunk is parsed in place.
/// After an error the stream's framing is lost: every later call returns
/// [`Error::DecoderFailed`].
#[derive(Debug, Default)]
pub(crate) struct FrameBuffer {
    /// The bytes of the frame being received; empty between frames.
    partial: Vec<u8>,
    failed: bool,
    /// Reserve a frame's declared size once its header passed the protocol's check (between
    /// trusted nodes: fewer reallocations); otherwise the buffer grows only as bytes arrive (a
    /// client's declared size costs nothing until it sends the bytes).
    reserve_declared: bool,
}

impl FrameBuffer {
    /// A buffer that reserves each frame's declared size up front (see `reserve_declared`).
    pub(crate) fn reserving() -> FrameBuffer {
        FrameBuffer {
            reserve_declared: true,
            ..FrameBuffer::default()
        }
    }

    /// Takes bytes from the front of `input`, never past the end of the next frame, and returns
    /// `parse` of that frame once it is whole; `Ok(None)` means `input` is used up first.
    /// `frame_bytes` checks a header of `header_bytes` and returns the whole frame's size.
    pub(crate) fn next<T>(
        &mut self,
        input: &mut &[u8],
        header_bytes: usize,
        frame_bytes: impl Fn(&[u8]) -> Result<usize>,
        parse: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.failed {
            return Err(Error::DecoderFailed);
        }
        let result = self.next_inner(input, header_bytes, frame_bytes, parse);
        if result.is_err() {
            self.fail();
        }
        result
    }

    /// Marks the stream's framing as lost (see [`FrameBuffer::next`]).
    pub(crate) fn fail(&mut self) {
        self.failed = true;
        self.partial = Vec::new();
    }

    /// Whether an error ended this stream's framing.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// Bytes of an incomplete frame held from earlier calls.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.partial.len()
    }

    /// Capacity of the buffer held between frames.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    fn next_inner<T>(
        &mut self,
        input: &mut &[u8],
        header_bytes: usize,
        frame_bytes: impl Fn(&[u8]) -> Result<usize>,
        parse: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.partial.is_empty() && input.len() >= header_bytes {
            let total = frame_bytes(input)?;
            if input.len() >= total {
                let (frame, rest) = input.split_at(total);
                *input = rest;
                return parse(frame).map(Some);
            }
        }
        if self.partial.len() < header_bytes {
            let take = (header_bytes - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.partial.len() < header_bytes {
                return Ok(None);
            }
        }
        let total = frame_bytes(&self.partial)?;
        if self.reserve_declared {
            self.partial
                .reserve_exact(total.saturating_sub(self.partial.len()));
        }
        let take = (total - self.partial.len()).min(input.len());
        self.partial.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.partial.len() < total {
            return Ok(None);
        }
        let frame = parse(&self.partial);
        self.partial.clear();
        if self.partial.capacity() > DECODER_IDLE_CAPACITY_BYTES_MAX {
            self.partial = Vec::new();
        }
        frame.map(Some)
    }
}
