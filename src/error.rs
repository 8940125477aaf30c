//! The one error type of the library, with a stable numeric code per variant for the C ABI.

use std::io;

use crate::wire::WireError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way a kvtransfer call can fail.
///
/// Each variant has a stable numeric [`code`](Error::code); codes are never reused, so a C
/// caller can switch on them across versions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig {
        /// The field (or environment variable) at fault.
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An argument of a call is invalid (null pointer, bad enum value, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request or registration has zero length.
    #[error("zero-length {what}")]
    ZeroLength {
        /// What had zero length ("registration", "request").
        what: &'static str,
    },
    /// A registration overlaps an existing segment.
    #[error(
        "memory [{addr:#x}, +{len}) overlaps registered segment {existing} [{existing_addr:#x}, +{existing_len})"
    )]
    OverlappingRegistration {
        /// Start of the new range.
        addr: u64,
        /// Length of the new range.
        len: u64,
        /// The segment it overlaps.
        existing: u32,
        /// Start of that segment.
        existing_addr: u64,
        /// Length of that segment.
        existing_len: u64,
    },
    /// A local address range is not inside one registered segment.
    #[error("local memory [{addr:#x}, +{len}) is not inside a registered segment")]
    UnregisteredAddress {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// No segment with this id exists (locally, or at the peer for remote ids).
    #[error("unknown segment {segment}")]
    UnknownSegment {
        /// The id asked for.
        segment: u32,
    },
    /// A remote range falls outside the peer's segment.
    #[error("remote range [+{offset}, +{len}) is outside segment {segment} of {segment_len} bytes")]
    RemoteOutOfRange {
        /// Segment id at the peer.
        segment: u32,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of that segment.
        segment_len: u64,
    },
    /// A segment cannot be unregistered while transfers use it.
    #[error("segment {segment} has {in_flight} transfer(s) in flight")]
    SegmentBusy {
        /// The segment.
        segment: u32,
        /// How many transfers hold it.
        in_flight: u64,
    },
    /// No peer with this handle is known to the engine.
    #[error("unknown peer {peer}")]
    UnknownPeer {
        /// The handle given.
        peer: u64,
    },
    /// No batch with this id is known (never submitted, or already released).
    #[error("unknown batch {batch}")]
    UnknownBatch {
        /// The batch id given.
        batch: u64,
    },
    /// The connection to a peer was lost.
    #[error("peer {peer} (epoch {epoch:#x}) lost: {reason}")]
    PeerLost {
        /// The peer's bootstrap address.
        peer: String,
        /// The peer's epoch.
        epoch: u64,
        /// What happened.
        reason: String,
    },
    /// A deadline passed before the operation finished.
    #[error("deadline of {after_ms} ms exceeded: {what}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The deadline, in milliseconds.
        after_ms: u64,
    },
    /// A transfer batch failed; the reason says which slice and why.
    #[error("batch {batch} failed: {reason}")]
    BatchFailed {
        /// The batch id.
        batch: u64,
        /// Why.
        reason: String,
    },
    /// The peer refused a request (its own check failed); `remote_code` is its error code.
    #[error("peer rejected the request: {message} (peer code {remote_code})")]
    RemoteRejected {
        /// The peer's error code for the refusal.
        remote_code: i32,
        /// A description.
        message: String,
    },
    /// The bootstrap handshake failed or the peer sent malformed protocol data.
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    /// The peer speaks another protocol version or is not a kvtransfer engine.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The requested transport is not available on this host.
    #[error("transport {transport} unavailable: {reason}")]
    TransportUnavailable {
        /// Transport name.
        transport: &'static str,
        /// Why (library missing, no device, ...).
        reason: String,
    },
    /// The engine is shutting down.
    #[error("engine is shut down")]
    Shutdown,
    /// An operating-system call failed.
    #[error("{call} failed: {source}")]
    Io {
        /// The call or operation.
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A Rust panic was caught at the C boundary.
    #[error("internal panic: {0}")]
    Panic(String),
    /// rdma-core's `libibverbs.so.1` could not be loaded.
    #[error("RDMA unavailable: rdma-core (libibverbs.so.1) is not installed")]
    RdmaCoreMissing,
    /// The kernel has no RDMA support (no `/sys/class/infiniband_verbs`).
    #[error("RDMA unavailable: the kernel has no RDMA support (no /sys/class/infiniband_verbs)")]
    RdmaKernelMissing,
    /// No usable RDMA device.
    #[error("RDMA unavailable: {reason}")]
    NoRdmaDevice {
        /// Why (none present, none allowed, ...).
        reason: String,
    },
    /// A device port is not active.
    #[error("RDMA port {device}:{port} is {state}, not active")]
    PortDown {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// Its state.
        state: String,
    },
    /// A verbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        /// The verb.
        call: &'static str,
        /// What it reported.
        #[source]
        source: io::Error,
    },
    /// No room with this id exists here (or it was already destroyed).
    #[error("unknown room {room}")]
    UnknownRoom {
        /// The room id.
        room: u64,
    },
    /// A room with this id is already live in this manager (or at the peer).
    #[error("room {room} already exists")]
    DuplicateRoom {
        /// The room id.
        room: u64,
    },
    /// Page indices of a room are unusable: negative, out of range, or counts that do not match.
    #[error("room {room}: invalid pages: {reason}")]
    InvalidPages {
        /// The room id.
        room: u64,
        /// What is wrong with them.
        reason: String,
    },
    /// The two sides' KV layouts cannot be paired (buffer count or page size differ).
    #[error("KV layout mismatch: {reason}")]
    LayoutMismatch {
        /// What differs.
        reason: String,
    },
    /// The room failed (deadline, abort, peer lost, rejected by the peer).
    #[error("room {room} failed: {reason}")]
    RoomFailed {
        /// The room id.
        room: u64,
        /// Why.
        reason: String,
    },
    /// No segment the peer registered covers these bytes at its address.
    #[error("peer memory [{addr:#x}, +{len}) is not inside a segment the peer registered")]
    RemoteUnregistered {
        /// Peer address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The operation does not fit the room's current state.
    #[error("room {room} is {state}: cannot {op}")]
    RoomState {
        /// The room id.
        room: u64,
        /// Its state (a `KvPoll` name).
        state: &'static str,
        /// What was attempted.
        op: &'static str,
    },
    /// CUDA cannot be used here: the driver library is missing, has no device, or is too old.
    /// GPU memory cannot be registered; host memory works as before.
    #[error("CUDA unavailable: {reason}")]
    CudaUnavailable {
        /// Why (e.g. `libcuda.so.1 not found`).
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("{call} failed: {name} ({code})")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// Its `CUresult` value.
        code: i32,
        /// The `CUresult` name (e.g. `CUDA_ERROR_INVALID_VALUE`).
        name: String,
    },
    /// The peer and this engine do not share the cluster secret: one holds none, or they hold
    /// different ones. Nothing about either engine was revealed to the other.
    #[error("authentication with {peer} failed: {reason}")]
    Unauthenticated {
        /// The peer's address.
        peer: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The stable numeric code of this error (positive; the C ABI returns its negation).
    pub fn code(&self) -> i32 {
        match self {
            Error::InvalidConfig { .. } => 1,
            Error::InvalidArgument(_) => 2,
            Error::ZeroLength { .. } => 3,
            Error::OverlappingRegistration { .. } => 4,
            Error::UnregisteredAddress { .. } => 5,
            Error::UnknownSegment { .. } => 6,
            Error::RemoteOutOfRange { .. } => 7,
            Error::SegmentBusy { .. } => 8,
            Error::UnknownPeer { .. } => 9,
            Error::UnknownBatch { .. } => 10,
            Error::PeerLost { .. } => 11,
            Error::Timeout { .. } => 12,
            Error::BatchFailed { .. } => 13,
            Error::RemoteRejected { .. } => 14,
            Error::Protocol(_) => 15,
            Error::Handshake { .. } => 16,
            Error::TransportUnavailable { .. } => 17,
            Error::Shutdown => 18,
            Error::Io { .. } => 19,
            Error::Panic(_) => 20,
            Error::RdmaCoreMissing => 21,
            Error::RdmaKernelMissing => 22,
            Error::NoRdmaDevice { .. } => 23,
            Error::PortDown { .. } => 24,
            Error::Verbs { .. } => 25,
            Error::UnknownRoom { .. } => 26,
            Error::DuplicateRoom { .. } => 27,
            Error::InvalidPages { .. } => 28,
            Error::LayoutMismatch { .. } => 29,
            Error::RoomFailed { .. } => 30,
            Error::RoomState { .. } => 31,
            Error::CudaUnavailable { .. } => 32,
            Error::Cuda { .. } => 33,
            Error::RemoteUnregistered { .. } => 34,
            Error::Unauthenticated { .. } => 35,
        }
    }

    /// Wraps an `io::Error` with the name of the failing call.
    pub(crate) fn io(call: &'static str, source: io::Error) -> Self {
        Error::Io { call, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_positive() {
        let all = [
            Error::InvalidConfig {
                field: "x".into(),
                reason: "y".into(),
            },
            Error::InvalidArgument("x".into()),
            Error::ZeroLength { what: "request" },
            Error::OverlappingRegistration {
                addr: 0,
                len: 1,
                existing: 0,
                existing_addr: 0,
                existing_len: 1,
            },
            Error::UnregisteredAddress { addr: 0, len: 1 },
            Error::UnknownSegment { segment: 1 },
            Error::RemoteOutOfRange {
                segment: 1,
                offset: 0,
                len: 1,
                segment_len: 0,
            },
            Error::SegmentBusy {
                segment: 1,
                in_flight: 1,
            },
            Error::UnknownPeer { peer: 1 },
            Error::UnknownBatch { batch: 1 },
            Error::PeerLost {
                peer: "p".into(),
                epoch: 1,
                reason: "r".into(),
            },
            Error::Timeout {
                what: "w".into(),
                after_ms: 1,
            },
            Error::BatchFailed {
                batch: 1,
                reason: "r".into(),
            },
            Error::RemoteRejected {
                remote_code: 5,
                message: "m".into(),
            },
            Error::Protocol(WireError::BadMagic { got: 0 }),
            Error::Handshake {
                peer: "p".into(),
                reason: "r".into(),
            },
            Error::TransportUnavailable {
                transport: "rdma",
                reason: "r".into(),
            },
            Error::Shutdown,
            Error::io("recv", io::Error::other("x")),
            Error::Panic("p".into()),
            Error::RdmaCoreMissing,
            Error::RdmaKernelMissing,
            Error::NoRdmaDevice { reason: "r".into() },
            Error::PortDown {
                device: "d".into(),
                port: 1,
                state: "DOWN".into(),
            },
            Error::Verbs {
                call: "ibv_reg_mr",
                source: io::Error::other("x"),
            },
            Error::UnknownRoom { room: 1 },
            Error::DuplicateRoom { room: 1 },
            Error::InvalidPages {
                room: 1,
                reason: "r".into(),
            },
            Error::LayoutMismatch { reason: "r".into() },
            Error::RoomFailed {
                room: 1,
                reason: "r".into(),
            },
            Error::RoomState {
                room: 1,
                state: "Bootstrapping",
                op: "send",
            },
            Error::CudaUnavailable { reason: "r".into() },
            Error::Cuda {
                call: "cuInit",
                code: 100,
                name: "CUDA_ERROR_NO_DEVICE".into(),
            },
            Error::RemoteUnregistered { addr: 0, len: 1 },
            Error::Unauthenticated {
                peer: "p".into(),
                reason: "r".into(),
            },
        ];
        let mut codes: Vec<i32> = all.iter().map(Error::code).collect();
        assert!(codes.iter().all(|c| *c > 0));
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n, "every variant has its own code");
        assert_eq!(
            codes.last(),
            Some(&35),
            "codes are dense and appended at the end"
        );
    }
}
