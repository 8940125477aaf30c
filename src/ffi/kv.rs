//! KV managers: one per process and role, owning an engine with the KV cache registered.

use std::ffi::c_char;
use std::time::Duration;

use super::boundary::guard;
use super::engine::{engine_config, kvt_engine_config};
use super::pointers::{arg_ref, c_slice, into_handle, out_param, take_handle, write_c_str};
use super::versioned::{Versioned, field_spans, read_versioned};
use crate::error::{Error, Result};
use crate::kv::{KvBuffer, KvConfig, KvLayout, KvManager, KvRole};

/// `kvt_kv_config.role`: computes the KV cache and sends it (`kvt_kv_sender`).
pub const KVT_ROLE_PREFILL: u32 = 0;
/// `kvt_kv_config.role`: receives it (`kvt_kv_receiver`).
pub const KVT_ROLE_DECODE: u32 = 1;

/// A KV manager: an engine of its own with the KV layout registered, serving rooms in one
/// role. Thread-safe: any thread may use it, but `kvt_kv_manager_destroy` must not race
/// another call on it.
pub struct kvt_kv_manager {
    pub(crate) manager: KvManager,
}

/// One buffer of the KV cache: `len` bytes at `addr`, made of items of `item_len` bytes (the
/// pages of one layer, or aux slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvt_kv_buffer {
    /// Start address (host memory).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Bytes of one item (page or aux slot).
    pub item_len: u64,
}

/// Settings and layout of a KV manager. Set `struct_size` to `sizeof(kvt_kv_config)`. Page
/// `p` of buffer `b` is the `item_len` bytes at `buffers[b].addr + p * item_len`; MLA models
/// have one buffer per layer, MHA/GQA a K and a V buffer per layer, listed in the same order
/// on both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvt_kv_config {
    /// `sizeof(kvt_kv_config)` as the caller was compiled.
    pub struct_size: u32,
    /// `KVT_ROLE_PREFILL` or `KVT_ROLE_DECODE`.
    pub role: u32,
    /// A room not finished this long after it was created fails; 0: `KVT_ROOM_TIMEOUT_MS`,
    /// else 60000.
    pub room_timeout_ms: u64,
    /// The page buffers (at least one).
    pub buffers: *const kvt_kv_buffer,
    /// How many page buffers.
    pub num_buffers: usize,
    /// The aux buffers (NULL when `num_aux` is 0).
    pub aux: *const kvt_kv_buffer,
    /// How many aux buffers.
    pub num_aux: usize,
    /// How long an abort waits for writes in flight to finish before it cuts the peer off; 0:
    /// `KVT_ABORT_TIMEOUT_MS`, else 10000. (Added after the first release: callers compiled
    /// without it leave it out of `struct_size` and get the default.)
    pub abort_timeout_ms: u64,
    /// Decode: a control channel to a prefill manager that has not opened this long after a
    /// room asked for it fails its rooms (`KVT_FAILURE_TIMEOUT`); connecting happens in the
    /// background, no call waits for it. 0: `KVT_KV_CONNECT_TIMEOUT_MS`, else 5000. (Added
    /// later, like `abort_timeout_ms`.)
    pub connect_timeout_ms: u64,
    /// A peer manager silent this long (no heartbeat) is lost: its rooms fail with
    /// `KVT_FAILURE_PEER_LOST`. 0: `KVT_HEARTBEAT_TIMEOUT_MS`, else 5000. (Added later.)
    pub heartbeat_timeout_ms: u64,
    /// Decode: 1 makes every room ask its sender for a digest of each chunk and verify it
    /// before Success (a mismatch fails the room with `KVT_FAILURE_INTEGRITY`); host memory
    /// only. 0: `KVT_KV_INTEGRITY`, else off. (Added later.)
    pub integrity: u32,
}

impl Versioned for kvt_kv_config {
    const C_NAME: &'static str = "kvt_kv_config";
    fn zeroed() -> Self {
        kvt_kv_config {
            struct_size: 0,
            role: 0,
            room_timeout_ms: 0,
            buffers: std::ptr::null(),
            num_buffers: 0,
            aux: std::ptr::null(),
            num_aux: 0,
            abort_timeout_ms: 0,
            connect_timeout_ms: 0,
            heartbeat_timeout_ms: 0,
            integrity: 0,
        }
    }
    fn fields() -> Vec<(usize, usize)> {
        field_spans!(kvt_kv_config; struct_size, role, room_timeout_ms, buffers, num_buffers,
            aux, num_aux, abort_timeout_ms, connect_timeout_ms, heartbeat_timeout_ms, integrity)
    }
}

fn kv_buffers(list: &[kvt_kv_buffer]) -> Vec<KvBuffer> {
    list.iter()
        .map(|b| KvBuffer {
            addr: b.addr,
            len: b.len,
            item_len: b.item_len,
        })
        .collect()
}

/// The role, settings and layout `kv` asks for.
///
/// # Safety
/// `kv` is NULL or a `kvt_kv_config` whose arrays hold `num_buffers` and `num_aux` entries.
unsafe fn kv_settings(kv: *const kvt_kv_config) -> Result<(KvConfig, KvLayout)> {
    // SAFETY: forwarded contract.
    let c = unsafe { read_versioned(kv, "kv") }?;
    let role = match c.role {
        KVT_ROLE_PREFILL => KvRole::Prefill,
        KVT_ROLE_DECODE => KvRole::Decode,
        other => {
            return Err(Error::InvalidConfig {
                field: "role".into(),
                reason: format!("{other} is not KVT_ROLE_PREFILL (0) or KVT_ROLE_DECODE (1)"),
            });
        }
    };
    let mut config = KvConfig::new(role);
    if c.room_timeout_ms != 0 {
        config = config.room_timeout(Duration::from_millis(c.room_timeout_ms));
    }
    if c.abort_timeout_ms != 0 {
        config = config.abort_timeout(Duration::from_millis(c.abort_timeout_ms));
    }
    if c.connect_timeout_ms != 0 {
        config = config.connect_timeout(Duration::from_millis(c.connect_timeout_ms));
    }
    if c.heartbeat_timeout_ms != 0 {
        config = config.heartbeat_timeout(Duration::from_millis(c.heartbeat_timeout_ms));
    }
    match c.integrity {
        0 => {}
        1 => config = config.integrity(true),
        other => {
            return Err(Error::InvalidConfig {
                field: "integrity".into(),
                reason: format!("{other} is not 0 (the default) or 1 (on)"),
            });
        }
    }
    // SAFETY: the arrays hold num_buffers and num_aux entries by the contract.
    let (buffers, aux) = unsafe {
        (
            c_slice(c.buffers, c.num_buffers, "kv->buffers")?,
            c_slice(c.aux, c.num_aux, "kv->aux")?,
        )
    };
    let layout = KvLayout::new(kv_buffers(buffers), kv_buffers(aux))?;
    Ok((config, layout))
}

/// Starts a KV manager: an engine with `engine`'s settings (NULL: defaults) that registers
/// every buffer of `kv` and serves rooms in `kv->role`. Stores the handle in `*out`. The
/// arrays of `kv` are copied; the buffers they describe are not.
///
/// # Safety
/// `engine` is NULL or a valid `kvt_engine_config`; `kv` points to a valid `kvt_kv_config`;
/// `out` is writable. Every buffer of the layout must stay valid, and must not be freed,
/// until the manager and every sender and receiver made from it are destroyed: peers write
/// into (decode) or read from (prefill) that memory.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_manager_create(
    engine: *const kvt_engine_config,
    kv: *const kvt_kv_config,
    out: *mut *mut kvt_kv_manager,
) -> i32 {
    guard(|| {
        // SAFETY: writable by the contract.
        let out = unsafe { out_param(out, "out") }?;
        // SAFETY: forwarded contract.
        let (config, layout) = unsafe { kv_settings(kv) }?;
        // SAFETY: forwarded contract.
        let engine = unsafe { engine_config(engine) }?;
        // SAFETY: the caller keeps every layout buffer valid for the manager's lifetime and
        // that of its rooms (the contract above).
        let manager = unsafe { KvManager::new(engine, config, layout) }?;
        out.write(into_handle(kvt_kv_manager { manager }));
        Ok(())
    })
}

/// Stops a manager and frees its handle; NULL is a no-op. Its KV channels close and its
/// engine stops as `kvt_engine_destroy` says, even while room handles still exist: over TCP,
/// once this returns no write of any room lands in the layout's memory, so it may be freed at
/// once. Room handles left over fail their calls (destroy them too, preferably first).
///
/// # Safety
/// `m` is NULL or a handle from `kvt_kv_manager_create` not destroyed yet, used by no other
/// thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_manager_destroy(m: *mut kvt_kv_manager) -> i32 {
    guard(|| {
        // SAFETY: forwarded contract.
        drop(unsafe { take_handle(m) });
        Ok(())
    })
}

/// The address peers use to reach this manager (`"ip:port"`, its engine's bootstrap
/// address), into `buf` of `cap` bytes with a NUL. A decode side passes the prefill side's
/// address to `kvt_kv_receiver_create`.
///
/// # Safety
/// `m` is a live manager handle; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvt_kv_manager_bootstrap_addr(
    m: *const kvt_kv_manager,
    buf: *mut c_char,
    cap: usize,
) -> i32 {
    guard(|| {
        // SAFETY: a live handle by the contract.
        let m = unsafe { arg_ref(m, "m") }?;
        let addr = m.manager.bootstrap_addr().to_string();
        // SAFETY: writable for cap bytes by the contract.
        unsafe { write_c_str(buf, cap, &addr, "buf") }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(role: u32, buffers: &[kvt_kv_buffer]) -> kvt_kv_config {
        kvt_kv_config {
            struct_size: std::mem::size_of::<kvt_kv_config>() as u32,
            role,
            buffers: buffers.as_ptr(),
            num_buffers: buffers.len(),
            ..kvt_kv_config::zeroed()
        }
    }

    #[test]
    fn settings_from_a_config() {
        let b = [kvt_kv_buffer {
            addr: 0x10000,
            len: 8192,
            item_len: 4096,
        }];
        let mut c = config(KVT_ROLE_DECODE, &b);
        c.room_timeout_ms = 1500;
        c.abort_timeout_ms = 250;
        // SAFETY: a live config whose array holds one buffer.
        let (cfg, layout) = unsafe { kv_settings(&c) }.unwrap();
        assert_eq!(cfg.role, KvRole::Decode);
        assert_eq!(cfg.room_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.abort_timeout, Duration::from_millis(250));
        assert_eq!(layout.pages(), 2);
        assert!(layout.aux.is_empty());
    }

    #[test]
    fn bad_configs_are_refused() {
        let b = [kvt_kv_buffer {
            addr: 0x10000,
            len: 8192,
            item_len: 4096,
        }];
        // SAFETY: every call gets a live config whose arrays hold what their counts say.
        unsafe {
            let e = kv_settings(&config(2, &b)).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "role"));
            // No page buffer.
            assert_eq!(
                kv_settings(&config(KVT_ROLE_PREFILL, &[]))
                    .unwrap_err()
                    .code(),
                2
            );
            // A count with a NULL array.
            let mut c = config(KVT_ROLE_PREFILL, &b);
            c.num_aux = 1;
            let e = kv_settings(&c).unwrap_err();
            assert_eq!(e.to_string(), "invalid argument: kv->aux is NULL");
            // struct_size covering only struct_size and role: no buffers are read.
            let mut c = config(KVT_ROLE_PREFILL, &b);
            c.struct_size = 8;
            assert!(
                kv_settings(&c)
                    .unwrap_err()
                    .to_string()
                    .contains("at least one page buffer")
            );
            c.struct_size = 4;
            assert!(
                kv_settings(&c)
                    .unwrap_err()
                    .to_string()
                    .contains("kv->struct_size is 4")
            );
        }
    }
}
