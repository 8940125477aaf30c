//! The fixed 40-byte header of every TCP data frame.

use super::*;

pub(super) fn frame_op_from_u8(v: u8) -> Result<FrameOp, WireError> {
    match v {
        1 => Ok(FrameOp::Write),
        2 => Ok(FrameOp::ReadRequest),
        3 => Ok(FrameOp::ReadResponse),
        4 => Ok(FrameOp::Ack),
        5 => Ok(FrameOp::SegmentsRequest),
        6 => Ok(FrameOp::SegmentsResponse),
        7 => Ok(FrameOp::Notify),
        _ => Err(WireError::Malformed {
            what: "frame header",
            detail: format!("unknown op {v}"),
        }),
    }
}

/// Kinds of data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameOp {
    /// Initiator → target: write `len` payload bytes at `segment` + `offset`.
    Write = 1,
    /// Initiator → target: send back `len` bytes from `segment` + `offset`.
    ReadRequest = 2,
    /// Target → initiator: the bytes of the oldest outstanding read request (`len` payload).
    ReadResponse = 3,
    /// Target → initiator: every frame of `batch` flagged up to the LAST one was applied
    /// (`status` 0) or refused (`status` = error code).
    Ack = 4,
    /// Initiator → target: send your current segment list.
    SegmentsRequest = 5,
    /// Target → initiator: `len` payload bytes of [`encode_segments`].
    SegmentsResponse = 6,
    /// Either way: in-band notification `tag` for `batch` (used by KV rooms).
    Notify = 7,
}

/// Frame flag: the last frame of this batch on this connection; the target acks after it.
pub const FLAG_LAST: u8 = 1;

/// Fixed 40-byte header that starts every data frame.
///
/// Layout: op u8, flags u8, status u16, segment u32, batch u64, offset u64, len u64, tag u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub op: FrameOp,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
    /// 0, or an error code (acks and read responses).
    pub status: u16,
    /// Segment id at the target.
    pub segment: u32,
    /// Batch id at the initiator.
    pub batch: u64,
    /// Offset in the segment.
    pub offset: u64,
    /// Payload length (Write, ReadResponse, SegmentsResponse) or requested length (ReadRequest).
    pub len: u64,
    /// Free tag (room id / sequence for notifications).
    pub tag: u64,
}

impl FrameHeader {
    /// Encodes to the fixed 40-byte form.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = self.op as u8;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.status.to_le_bytes());
        out[4..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.batch.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out[32..40].copy_from_slice(&self.tag.to_le_bytes());
        out
    }

    /// Decodes and validates (known op, known flags, payload length within limits).
    pub fn decode(buf: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let mut r = Reader::new(buf);
        let op = frame_op_from_u8(r.u8("frame op")?)?;
        let flags = r.u8("frame flags")?;
        if flags & !FLAG_LAST != 0 {
            return Err(WireError::Malformed {
                what: "frame header",
                detail: format!("unknown flags {flags:#04x}"),
            });
        }
        let header = FrameHeader {
            op,
            flags,
            status: r.u16("frame status")?,
            segment: r.u32("frame segment")?,
            batch: r.u64("frame batch")?,
            offset: r.u64("frame offset")?,
            len: r.u64("frame length")?,
            tag: r.u64("frame tag")?,
        };
        r.finish("frame header")?;
        check_max("frame payload", header.payload_len(), MAX_FRAME_PAYLOAD)?;
        if op == FrameOp::ReadRequest {
            check_max("read request", header.len, MAX_FRAME_PAYLOAD)?;
        }
        Ok(header)
    }

    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.op {
            FrameOp::Write | FrameOp::ReadResponse | FrameOp::SegmentsResponse => self.len,
            _ => 0,
        }
    }
}
