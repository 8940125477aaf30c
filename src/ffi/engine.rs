//! Engines: create and destroy, addresses, memory registration, peers.

use std::ffi::c_char;
use std::time::Duration;

use super::boundary::guard;
use super::pointers::{
    arg_ref, c_str, into_handle, opt_c_str, out_param, out_slice, take_handle, write_c_str,
};
use super::versioned::{Versioned, field_spans, read_versioned};
use crate::config::{EngineConfig, TransportKind};
use crate::engine::{PeerId, TransferEngine};
use crate::error::{Error, Result};
use crate::memory::{MemoryKind, SegmentId};

/// `kvt_engine_config.transport`: RDMA where usable on both ends, else TCP (the default).
pub const KVT_TRANSPORT_AUTO: u32 = 0;
/// `kvt_engine_config.transport`: TCP only.
pub const KVT_TRANSPORT_TCP: u32 = 1;
/// `kvt_engine_config.transport`: RDMA only (creating the engine fails where it is unusable).
pub const KVT_TRANSPORT_RDMA: u32 = 2;

/// An engine: registered memory, a bootstrap listener, peers and batches. Thread-safe: any
/// thread may use it, but `kvt_engine_destroy` must not race another call on it.
pub struct kvt_engine {
    pub(crate) engine: TransferEngine,
}

/// Settings of an engine. Set `struct_size` to `sizeof(kvt_engine_config)`; a zero or NULL
/// field takes the default, which honours the `KVT_*` environment variables.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvt_engine_config {
    /// `sizeof(kvt_engine_config)` as the caller was compiled.
    pub struct_size: u32,
    /// Bootstrap listen address `"ip:port"`; NULL: `KVT_LISTEN`, else `127.0.0.1:0`.
    pub listen: *const c_char,
    /// `KVT_TRANSPORT_AUTO` (0: `KVT_TRANSPORT`, else auto), `_TCP` or `_RDMA`.
    pub transport: u32,
    /// TCP data connections per peer; 0: `KVT_CONNECTIONS`, else 2. (RDMA QPs per rail come
    /// from `KVT_QPS_PER_RAIL`, default 2.)
    pub connections_per_peer: u32,
    /// Default batch deadline in ms; 0: `KVT_BATCH_TIMEOUT_MS`, else 30000.
    pub batch_timeout_ms: u64,
    /// RDMA device allow-list such as `"mlx5_0,mlx5_3"`; NULL: `KVT_DEVICES`, else all.
    pub devices: *const c_char,
    /// The cluster secret (at least 16 bytes) every engine of the deployment holds; peers
    /// prove it to each other before anything is revealed. NULL: `KVT_SECRET` /
    /// `KVT_SECRET_FILE`, else none. (Added later: callers compiled without it leave it out of
    /// `struct_size`.)
    pub secret: *const c_char,
    /// A file holding the cluster secret (a trailing newline is not part of it); NULL: as for
    /// `secret`. `secret` wins when both are set. (Added later.)
    pub secret_file: *const c_char,
}

impl Versioned for kvt_engine_config {
    const C_NAME: &'static str = "kvt_engine_config";
    fn zeroed() -> Self {
        kvt_engine_config {
            struct_size: 0,
            listen: std::ptr::null(),
            transport: 0,
            connections_per_peer: 0,
            batch_timeout_ms: 0,
            devices: std::ptr::null(),
            secret: std::ptr::null(),
            secret_file: std::ptr::null(),
        }
    }
    fn fields() -> Vec<(usize, usize)> {
        field_spans!(kvt_engine_config; struct_size, listen, transport,
            connections_per_peer, batch_timeout_ms, devices, secret, secret_file)
    }
}

fn invalid_config(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// The engine settings `cfg` asks for: defaults, then `KVT_*` variables, then the non-zero
/// fields of `cfg`.
///
/// # Safety
/// `cfg` is NULL or a `kvt_engine_config` whose strings are NULL or NUL-terminated.
pub(crate) unsafe fn engine_config(cfg: *const kvt_engine_config) -> Result<EngineConfig> {
    let mut b = EngineConfig::builder().env_overrides();
    if cfg.is_null() {
        return b.build();
    }
    // SAFETY: non-null, and a kvt_engine_config of struct_size bytes by the contract.
    let c = unsafe { read_versioned(cfg, "cfg") }?;
    // SAFETY: the strings are NULL or NUL-terminated by the contract.
    if let Some(listen) = unsafe { opt_c_str(c.listen, "cfg->listen") }? {
        b = b.listen(listen);
    }
    b = match c.transport {
        KVT_TRANSPORT_AUTO => b,
        KVT_TRANSPORT_TCP => b.transport(TransportKind::Tcp),
        KVT_TRANSPORT_RDMA => b.transport(TransportKind::Rdma),
        other => {
            return Err(invalid_config(
                "transport",
                format!("{other} is not KVT_TRANSPORT_AUTO (0), _TCP (1) or _RDMA (2)"),
            ));
        }
    };
    if c.connections_per_peer != 0 {
        b = b.connections_per_peer(c.connections_per_peer as usize);
    }
    if c.batch_timeout_ms != 0 {
        b = b.batch_timeout(Duration::from_millis(c.batch_timeout_ms));
    }
    // SAFETY: as for listen.
    if let Some(devices) = unsafe { opt_c_str(c.devices, "cfg->devices") }? {
        let list: Vec<&str> = devices
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        if !list.is_empty() {
            b = b.devices(list);
        }
    }
    // SAFETY: as for listen.
    if let Some(path) = unsafe { opt_c_str(c.secret_file, "cfg->secret_file") }? {
        b = b.secret_file(path);
    }
    // SAFETY: as for listen.
    if let Some(secret) = unsafe { opt_c_str(c.secret, "cfg->secret") }? {
        b = b.secret(secret);
    }
    b.build()
}

/// Starts an engine with `cfg` (NULL: every default) and stores its handle in `*out`.
///
/// # Safety
/// `cfg` is NULL or points to a `kvt_engine_config` of at least `struct_size` bytes whose
/// strings are NULL or NUL-terminated; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_create(
    cfg: *const kvt_engine_config,
    out: *mut *mut kvt_engine,
) -> i32 {
    guard(|| {
        // SAFETY: out is writable by the contract.
        let out = unsafe { out_param(out, "out") }?;
        // SAFETY: forwarded contract.
        let config = unsafe { engine_config(cfg) }?;
        let engine = TransferEngine::new(config)?;
        out.write(into_handle(kvt_engine { engine }));
        Ok(())
    })
}

/// Stops an engine and frees its handle; NULL is a no-op. Its peers are disconnected and
/// batches still in flight fail, its port is closed, and every connection it accepted is shut
/// down with its thread joined: over TCP, once this returns no library thread reads or writes
/// memory registered with the engine, so the caller may free or reuse it at once (tested by
/// unmapping it and mapping fresh memory at the same address mid-stream). Over RDMA the queue
/// pairs peers write through are destroyed before this returns, and the engine's own queue
/// pairs (which its READs land through) are moved to ERROR and their flushes awaited, for at
/// most 5 s (a warning is logged if that runs out).
///
/// # Safety
/// `e` is NULL or a handle from `kvt_engine_create` not destroyed yet, used by no other
/// thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_destroy(e: *mut kvt_engine) -> i32 {
    guard(|| {
        // SAFETY: forwarded contract.
        drop(unsafe { take_handle(e) });
        Ok(())
    })
}

/// The engine's bootstrap address (`"ip:port"`, the real port when 0 was configured), into
/// `buf` of `cap` bytes with a NUL; `KVT_ERR_INVALID_ARGUMENT` (nothing written) when it does
/// not fit. 64 bytes always suffice.
///
/// # Safety
/// `e` is a live engine handle; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_local_addr(
    e: *const kvt_engine,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        let addr = e.engine.local_addr().to_string();
        // SAFETY: buf is writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, &addr, "buf") }
    })
}

/// The transport in use, `"tcp"` or `"rdma"`, into `buf` of `cap` bytes with a NUL.
///
/// # Safety
/// `e` is a live engine handle; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_transport(
    e: *const kvt_engine,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: buf is writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, e.engine.transport(), "buf") }
    })
}

/// Registers the caller's memory `[addr, addr + len)` as a segment and stores its id in
/// `*out_segment`. Peers learn it from the handshake (or a refresh) and may then write or read
/// it at any time, from other threads.
///
/// # Safety
/// `e` is a live engine handle and `out_segment` writable. The range must stay mapped and
/// must not be freed while registered, and the caller must not touch a part of it while a
/// transfer that writes that part is in flight.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_register(
    e: *mut kvt_engine,
    addr: u64,
    len: u64,
    out_segment: *mut u32,
) -> i32 {
    let register = |engine: &crate::TransferEngine, addr: u64, len: usize| {
        // SAFETY: the caller keeps the range mapped while registered and respects transfers
        // in flight (the contract above is the engine's own).
        unsafe { engine.register_memory(addr as usize as *mut u8, len) }
    };
    // SAFETY: a live handle and a writable out-parameter by the contract.
    unsafe { register_with(e, addr, len, out_segment, register) }
}

/// The shared body of the registration calls: checks the arguments, registers with
/// `register`, stores the segment id.
///
/// # Safety
/// `e` is a live engine handle and `out_segment` writable.
unsafe fn register_with(
    e: *mut kvt_engine,
    addr: u64,
    len: u64,
    out_segment: *mut u32,
    register: impl FnOnce(&crate::TransferEngine, u64, usize) -> crate::Result<crate::SegmentInfo>,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_segment, "out_segment") }?;
        if addr == 0 {
            return Err(Error::InvalidArgument("addr is NULL".into()));
        }
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("len {len} does not fit in memory")))?;
        let info = register(&e.engine, addr, len)?;
        out.write(info.id.0);
        Ok(())
    })
}

/// Registers GPU device memory `[addr, addr + len)` and stores its segment id in
/// `*out_segment`. Unlike `kvt_engine_register`, which treats every address as host memory
/// where CUDA is absent, this fails with `KVT_ERR_CUDA_UNAVAILABLE` there, and with
/// `KVT_ERR_INVALID_ARGUMENT` when the range is not device memory.
///
/// # Safety
/// As for `kvt_engine_register`, for device memory.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_register_device(
    e: *mut kvt_engine,
    addr: u64,
    len: u64,
    out_segment: *mut u32,
) -> i32 {
    let register = |engine: &crate::TransferEngine, addr: u64, len: usize| {
        // SAFETY: the caller keeps the device range allocated while registered and respects
        // transfers in flight.
        unsafe { engine.register_device_memory(addr, len) }
    };
    // SAFETY: a live handle and a writable out-parameter by the contract.
    unsafe { register_with(e, addr, len, out_segment, register) }
}

/// Unregisters a segment; `KVT_ERR_SEGMENT_BUSY` while transfers use it.
///
/// # Safety
/// `e` is a live engine handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_unregister(e: *mut kvt_engine, segment: u32) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        e.engine.unregister_memory(SegmentId(segment))
    })
}

/// Connects to the engine whose bootstrap address is `addr` (`"ip:port"`): opens its data
/// connections, exchanges handshakes, learns its segments, and stores the peer handle in
/// `*out_peer`. Blocks up to the connect timeout. Each call makes a new peer.
///
/// # Safety
/// `e` is a live engine handle, `addr` NUL-terminated, `out_peer` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_connect(
    e: *mut kvt_engine,
    addr: *const c_char,
    out_peer: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out_peer, "out_peer") }?;
        // SAFETY: NUL-terminated by the contract.
        let addr = unsafe { c_str(addr, "addr") }?;
        let peer = e.engine.connect(addr)?;
        out.write(peer.0);
        Ok(())
    })
}

/// Closes the connections to `peer` and forgets the handle; its batches in flight fail.
/// `KVT_ERR_UNKNOWN_PEER` for a handle that is not (or no longer) connected.
///
/// # Safety
/// `e` is a live engine handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_disconnect(e: *mut kvt_engine, peer: u64) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        e.engine.disconnect(PeerId(peer))
    })
}

/// Maps `len` bytes at the peer's virtual address `addr` to the peer segment holding them
/// and the offset inside it (`*out_segment`, `*out_offset`), refreshing the peer's segment
/// list once if needed; `KVT_ERR_REMOTE_UNREGISTERED` when no segment of the peer covers them.
///
/// # Safety
/// `e` is a live engine handle; `out_segment` and `out_offset` are writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_resolve_remote(
    e: *mut kvt_engine,
    peer: u64,
    addr: u64,
    len: u64,
    out_segment: *mut u32,
    out_offset: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let out_segment = unsafe { out_param(out_segment, "out_segment") }?;
        // SAFETY: writable by the contract.
        let out_offset = unsafe { out_param(out_offset, "out_offset") }?;
        let (segment, offset) = e.engine.resolve_remote(PeerId(peer), addr, len)?;
        out_segment.write(segment.0);
        out_offset.write(offset);
        Ok(())
    })
}

/// `kvt_segment.kind`: host memory.
pub const KVT_MEMORY_HOST: u32 = 0;
/// `kvt_segment.kind`: GPU memory.
pub const KVT_MEMORY_GPU: u32 = 1;

/// A registered segment as a peer announced it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvt_segment {
    /// Segment id at its owner.
    pub id: u32,
    /// `KVT_MEMORY_HOST` or `KVT_MEMORY_GPU`.
    pub kind: u32,
    /// Start address in its owner's address space.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The segments `peer` has registered, in id order, as last learned (handshake or refresh);
/// with `refresh` non-zero, asks the peer first. Writes up to `cap` of them to `out` and the
/// total number to `*out_count` (so a call with `cap` 0 and `out` NULL asks for the count).
///
/// # Safety
/// `e` is a live engine handle; `out` is writable for `cap` entries (NULL when `cap` is 0);
/// `out_count` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_remote_segments(
    e: *mut kvt_engine,
    peer: u64,
    refresh: bool,
    out: *mut kvt_segment,
    cap: usize,
    out_count: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: writable by the contract.
        let count = unsafe { out_param(out_count, "out_count") }?;
        let list = if refresh {
            e.engine.refresh_segments(PeerId(peer))?
        } else {
            e.engine.remote_segments(PeerId(peer))?
        };
        if cap > 0 {
            // SAFETY: writable for cap entries by the contract.
            let dst = unsafe { out_slice(out, cap, "out") }?;
            for (d, s) in dst.iter_mut().zip(&list) {
                d.write(kvt_segment {
                    id: s.id.0,
                    kind: match s.kind {
                        MemoryKind::Host => KVT_MEMORY_HOST,
                        MemoryKind::Gpu => KVT_MEMORY_GPU,
                    },
                    base: s.base,
                    len: s.len,
                });
            }
        }
        count.write(list.len());
        Ok(())
    })
}

/// Checks that an engine answers at `addr` (`"ip:port"`) within `timeout_ms` (0: the connect
/// timeout): one connection and a handshake that reveals no segments and opens no peer on
/// either side. On success stores the engine's id and epoch (a restarted engine has a new
/// epoch) where the out-pointers are not NULL. Fails with `KVT_ERR_IO` (nothing listening,
/// unreachable, timed out) or `KVT_ERR_HANDSHAKE` / `KVT_ERR_PROTOCOL` (something else
/// listening).
///
/// # Safety
/// `e` is a live engine handle; `addr` is NUL-terminated; each out-pointer is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_engine_probe(
    e: *mut kvt_engine,
    addr: *const c_char,
    timeout_ms: u64,
    out_engine_id: *mut u64,
    out_epoch: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let e = unsafe { arg_ref(e, "e") }?;
        // SAFETY: NUL-terminated by the contract.
        let addr = unsafe { c_str(addr, "addr") }?;
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
        let reply = e.engine.probe(addr, timeout)?;
        if !out_engine_id.is_null() {
            // SAFETY: non-NULL, hence writable by the contract.
            unsafe { out_param(out_engine_id, "out_engine_id") }?.write(reply.engine_id);
        }
        if !out_epoch.is_null() {
            // SAFETY: non-NULL, hence writable by the contract.
            unsafe { out_param(out_epoch, "out_epoch") }?.write(reply.epoch);
        }
        Ok(())
    })
}

/// This host's topology matrix as JSON, in the shape of Mooncake's `get_local_topology`:
/// `{"cpu:<numa node>": [[preferred devices], [other devices]], "cuda:<gpu>": [...]}` over
/// the RDMA devices an engine with the allow-list `devices` (`"mlx5_0,mlx5_3"`; NULL or
/// empty: the KV rails) would use; `{}` where there is no usable RDMA port. Written to `buf`
/// of `cap` bytes with a NUL; `KVT_ERR_INVALID_ARGUMENT` (nothing written) when it does not fit.
///
/// # Safety
/// `devices` is NULL or NUL-terminated; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_local_topology(
    devices: *const c_char,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or NUL-terminated by the contract.
        let devices = unsafe { opt_c_str(devices, "devices") }?;
        let allow: Vec<String> = devices
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect();
        let allow = (!allow.is_empty()).then_some(allow);
        let json =
            crate::topology::matrix::local_json(std::path::Path::new("/sys"), allow.as_deref())?;
        // SAFETY: buf is writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, &json, "buf") }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> kvt_engine_config {
        kvt_engine_config {
            struct_size: std::mem::size_of::<kvt_engine_config>() as u32,
            ..kvt_engine_config::zeroed()
        }
    }

    #[test]
    fn config_fields_override_defaults() {
        let mut c = cfg();
        c.listen = c"127.0.0.1:0".as_ptr();
        c.transport = KVT_TRANSPORT_TCP;
        c.connections_per_peer = 3;
        c.batch_timeout_ms = 1234;
        c.devices = c"mlx5_0, mlx5_3:1".as_ptr();
        c.secret = c"a cluster secret of 32 bytes....".as_ptr();
        // SAFETY: a live config with NUL-terminated strings.
        let got = unsafe { engine_config(&c) }.unwrap();
        assert_eq!(
            got.secret,
            Some(crate::wire::Secret::new("a cluster secret of 32 bytes....").unwrap())
        );
        c.secret = c"too short".as_ptr();
        // SAFETY: as above.
        let short = unsafe { engine_config(&c) }.unwrap_err();
        assert!(short.to_string().contains("at least 16 bytes"), "{short}");
        assert_eq!(got.transport, TransportKind::Tcp);
        assert_eq!(got.connections_per_peer, 3);
        assert_eq!(got.batch_timeout, Duration::from_millis(1234));
        assert_eq!(
            got.devices,
            Some(vec!["mlx5_0".to_string(), "mlx5_3:1".to_string()])
        );
    }

    #[test]
    fn device_registration_without_cuda_is_minus_32_with_a_message() {
        if std::env::var_os("KVT_TEST_GPU").is_some() {
            return;
        }
        let mut c = cfg();
        c.transport = KVT_TRANSPORT_TCP;
        let mut e: *mut kvt_engine = std::ptr::null_mut();
        // SAFETY: a live config and a writable out-pointer.
        assert_eq!(unsafe { kvt_engine_create(&c, &mut e) }, crate::ffi::KVT_OK);
        let mut seg = u32::MAX;
        // Any address: without CUDA nothing can be device memory, and nothing is touched.
        // SAFETY: a live engine handle and a writable out-pointer.
        let rc = unsafe { kvt_engine_register_device(e, 0x7f00_0000_0000, 4096, &mut seg) };
        assert_eq!(rc, crate::ffi::KVT_ERR_CUDA_UNAVAILABLE);
        assert_eq!(seg, u32::MAX, "out-parameter untouched on failure");
        // SAFETY: read right after the failing call on this thread.
        let msg = unsafe { std::ffi::CStr::from_ptr(crate::ffi::kvt_last_error_message()) };
        let msg = msg.to_string_lossy();
        assert!(
            msg.contains("CUDA unavailable") && msg.contains("libcuda.so.1"),
            "{msg}"
        );
        // SAFETY: the handle made above, destroyed once.
        assert_eq!(unsafe { kvt_engine_destroy(e) }, crate::ffi::KVT_OK);
    }

    #[test]
    fn zero_fields_keep_defaults() {
        // SAFETY: a live config.
        let got = unsafe { engine_config(&cfg()) }.unwrap();
        // SAFETY: NULL is allowed.
        let null = unsafe { engine_config(std::ptr::null()) }.unwrap();
        assert_eq!(got, null);
        assert_eq!(got, EngineConfig::from_env().unwrap());
    }

    #[test]
    fn struct_size_limits_what_is_read() {
        // A caller whose struct ends after `transport`: the later fields are not read, even
        // though this one's memory holds values there.
        let mut c = cfg();
        c.transport = KVT_TRANSPORT_TCP;
        c.connections_per_peer = 0xdead;
        c.struct_size = (std::mem::offset_of!(kvt_engine_config, transport) + 4) as u32;
        // SAFETY: a live config.
        let got = unsafe { engine_config(&c) }.unwrap();
        assert_eq!(got.transport, TransportKind::Tcp);
        assert_eq!(
            got.connections_per_peer,
            EngineConfig::from_env().unwrap().connections_per_peer
        );
        c.struct_size = 0;
        // SAFETY: a live config.
        let e = unsafe { engine_config(&c) }.unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(
            e.to_string().contains("sizeof(kvt_engine_config) = 56"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_config_errors() {
        let mut c = cfg();
        c.transport = 7;
        // SAFETY: a live config.
        let e = unsafe { engine_config(&c) }.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "transport"));
        let mut c = cfg();
        c.listen = c"no such host".as_ptr();
        // SAFETY: a live config with a NUL-terminated string.
        assert_eq!(unsafe { engine_config(&c) }.unwrap_err().code(), 1);
    }
}
