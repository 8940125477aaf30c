//! CUDA through cudarc's driver API, loaded at run time: pointer classification, dma-buf
//! export, device buffers, and the copies that stage GPU memory through pinned host buffers.
//!
//! This is the only module that calls cudarc. `libcuda.so.1` is opened on first use
//! (`dynamic-loading`), so a host without the NVIDIA driver still loads and runs the library:
//! every function here then answers [`Error::CudaUnavailable`] with the reason (or, for
//! [`classify`], says every address is host memory). cudarc panics when the library or one
//! of its symbols is missing; no call is made before [`available`] checked both, and every
//! entry point runs inside [`std::panic::catch_unwind`] so that a panic inside cudarc becomes
//! `CudaUnavailable` rather than crossing the C boundary.

use std::ffi::{CStr, c_char, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Where an address lives, as the CUDA driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Ordinary pageable host memory. On a host without CUDA every address is reported as
    /// `Host`: there is no driver to ask, and no device memory can exist.
    Host,
    /// Host memory pinned by CUDA (`cuMemHostAlloc`, `cudaHostRegister`).
    PinnedHost,
    /// GPU device memory.
    Device {
        /// CUDA device ordinal.
        ordinal: u32,
        /// PCI bus id of the GPU, e.g. `0000:3B:00.0`.
        pci_bus_id: String,
    },
}

impl Placement {
    /// True for device memory.
    pub fn is_device(&self) -> bool {
        matches!(self, Placement::Device { .. })
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Host => write!(f, "host"),
            Placement::PinnedHost => write!(f, "pinned host"),
            Placement::Device {
                ordinal,
                pci_bus_id,
            } => write!(f, "GPU {ordinal} ({pci_bus_id})"),
        }
    }
}

/// The driver symbols every use needs; a driver without one of them is too old.
const REQUIRED: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetPCIBusId",
    "cuDevicePrimaryCtxRetain",
    "cuCtxGetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuPointerGetAttribute",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
];

/// What the driver reported when it was opened.
struct Driver {
    version: i32,
    devices: u32,
    /// `cuMemGetHandleForAddressRange` exists (CUDA 11.7+ drivers).
    dmabuf_export: bool,
    /// Primary context per device, retained on first use (held as an address: `CUcontext` is
    /// a raw pointer the driver owns for the process's lifetime once retained).
    contexts: Vec<OnceLock<usize>>,
    /// Staging resources per device, created on first use.
    stagers: Vec<OnceLock<std::result::Result<Arc<CudaStaging>, String>>>,
    /// How each device makes GPUDirect RDMA writes visible, asked on first use.
    visibility: Vec<OnceLock<WriteVisibility>>,
}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// Runs `f`, turning a panic (cudarc panics when the library or a symbol is missing) into
/// `CudaUnavailable`.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::CudaUnavailable {
                reason: format!("the CUDA loader panicked: {msg}"),
            })
        }
    }
}

/// Turns a `CUresult` into `Ok` or `Error::Cuda` naming the call.
fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            call,
            code: r as i32,
            name: format!("{r:?}"),
        })
    }
}

/// True when the loaded driver library exports `name`.
fn has_symbol(name: &str) -> bool {
    // SAFETY: only called after `is_culib_present` succeeded, so `culib` finds the library
    // instead of panicking; looking a symbol up runs no code of the library.
    unsafe { sys::culib().get::<*const c_void>(name.as_bytes()).is_ok() }
}

fn open_driver() -> std::result::Result<Driver, String> {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate names; it calls nothing.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda.so.1 not found (no NVIDIA driver on the loader path)".into());
    }
    if let Some(missing) = REQUIRED.iter().find(|s| !has_symbol(s)) {
        return Err(format!(
            "libcuda.so.1 lacks {missing} (driver too old for this library)"
        ));
    }
    // SAFETY: the library and the symbol are present (checked above); flags must be 0.
    check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| e.to_string())?;
    let mut version = 0;
    // SAFETY: `version` is a valid out-pointer.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut version)
    })
    .map_err(|e| e.to_string())?;
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer; cuInit succeeded.
    check("cuDeviceGetCount", unsafe {
        sys::cuDeviceGetCount(&mut count)
    })
    .map_err(|e| e.to_string())?;
    if count <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    let devices = count as u32;
    Ok(Driver {
        version,
        devices,
        dmabuf_export: has_symbol("cuMemGetHandleForAddressRange"),
        contexts: (0..devices).map(|_| OnceLock::new()).collect(),
        stagers: (0..devices).map(|_| OnceLock::new()).collect(),
        visibility: (0..devices).map(|_| OnceLock::new()).collect(),
    })
}

fn driver() -> Result<&'static Driver> {
    let d = DRIVER.get_or_init(|| match guarded(|| Ok(open_driver())) {
        Ok(r) => r,
        Err(e) => Err(e.to_string()),
    });
    d.as_ref().map_err(|reason| Error::CudaUnavailable {
        reason: reason.clone(),
    })
}

/// `Ok` when the CUDA driver is loaded, initialised and has at least one GPU; otherwise
/// `CudaUnavailable` with the reason (e.g. `libcuda.so.1 not found ...`). Never panics; the
/// answer is computed once per process.
pub fn available() -> Result<()> {
    driver().map(|_| ())
}

/// The driver's CUDA version (e.g. 12040) and its number of GPUs.
pub fn driver_info() -> Result<(i32, u32)> {
    driver().map(|d| (d.version, d.devices))
}

/// Whether the driver can export device memory as a dma-buf (`cuMemGetHandleForAddressRange`).
pub fn dmabuf_export_supported() -> Result<bool> {
    driver().map(|d| d.dmabuf_export)
}

/// How a GPU makes bytes a NIC wrote into its memory (GPUDirect RDMA: dma-buf or peermem)
/// visible to its own kernels once the NIC reported them written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteVisibility {
    /// The device orders remote writes with its own accesses
    /// (`CU_GPU_DIRECT_RDMA_WRITES_ORDERING_OWNER` or wider): nothing to do.
    Ordered,
    /// A `cuFlushGPUDirectRDMAWrites` (to the owner) after the writes makes them visible.
    Flush,
    /// The driver reports neither ordering nor a flush: visibility cannot be forced from
    /// the host (a consumer must synchronise on the device).
    Unforced,
}

impl WriteVisibility {
    /// What a device needs, from its `CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING`
    /// and `..._FLUSH_WRITES_OPTIONS` attributes and whether the driver exports the flush.
    pub(crate) fn of(ordering: i32, flush_options: i32, has_flush: bool) -> Self {
        const ORDERING_OWNER: i32 = 100;
        const OPTION_HOST: i32 = 1;
        if ordering >= ORDERING_OWNER {
            WriteVisibility::Ordered
        } else if has_flush && flush_options & OPTION_HOST != 0 {
            WriteVisibility::Flush
        } else {
            WriteVisibility::Unforced
        }
    }
}

/// What device `ordinal` needs to make GPUDirect RDMA writes visible (asked once, then
/// logged and cached).
pub fn write_visibility(ordinal: u32) -> Result<WriteVisibility> {
    let d = driver()?;
    let slot = d
        .visibility
        .get(ordinal as usize)
        .ok_or_else(|| Error::InvalidArgument(format!("no CUDA device {ordinal}")))?;
    if let Some(v) = slot.get() {
        return Ok(*v);
    }
    let v = guarded(|| {
        let mut dev: sys::CUdevice = 0;
        // SAFETY: valid out-pointer; the ordinal is below the device count.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal as i32)
        })?;
        if !has_symbol("cuDeviceGetAttribute") {
            return Ok(WriteVisibility::Unforced);
        }
        let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
            let mut v = 0;
            // SAFETY: valid out-pointer and device; an attribute this driver does not know
            // is an error code, not undefined behaviour.
            check("cuDeviceGetAttribute", unsafe {
                sys::cuDeviceGetAttribute(&mut v, a, dev)
            })?;
            Ok(v)
        };
        use sys::CUdevice_attribute as A;
        // Drivers older than CUDA 11.3 know neither attribute: nothing can be forced.
        let ordering = attr(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING).unwrap_or(0);
        let options =
            attr(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS).unwrap_or(0);
        let v = WriteVisibility::of(ordering, options, has_symbol("cuFlushGPUDirectRDMAWrites"));
        match v {
            WriteVisibility::Unforced => tracing::warn!(
                gpu = ordinal,
                ordering,
                options,
                "this GPU's driver offers no way to make GPUDirect RDMA writes visible from the \
                 host: a room into its memory succeeds once the NIC wrote the bytes"
            ),
            _ => tracing::info!(gpu = ordinal, ordering, options, visibility = ?v,
                "GPUDirect RDMA write visibility"),
        }
        Ok(v)
    })?;
    Ok(*slot.get_or_init(|| v))
}

/// Makes every GPUDirect RDMA write the NIC reported complete visible to device `ordinal`'s
/// kernels: a `cuFlushGPUDirectRDMAWrites` where the device needs one, nothing where it
/// orders them itself. Returns what the device needed.
pub fn flush_rdma_writes(ordinal: u32) -> Result<WriteVisibility> {
    let v = write_visibility(ordinal)?;
    if v == WriteVisibility::Flush {
        let d = driver()?;
        guarded(|| {
            let _ctx = bind(d, ordinal)?;
            use sys::CUflushGPUDirectRDMAWritesScope_enum as Scope;
            use sys::CUflushGPUDirectRDMAWritesTarget_enum as Target;
            // SAFETY: the driver exports the call (checked in `write_visibility`) and the
            // device's primary context is current on this thread until `_ctx` drops.
            check("cuFlushGPUDirectRDMAWrites", unsafe {
                sys::cuFlushGPUDirectRDMAWrites(
                    Target::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                    Scope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
                )
            })
        })?;
    }
    Ok(v)
}

/// Device `ordinal`'s primary context pushed on this thread's context stack; popped when
/// dropped, so the caller's thread gets its own current context back (a PyTorch thread on
/// device 3 stays on device 3).
#[must_use = "the context is popped when this is dropped"]
struct Bound(std::marker::PhantomData<*const ()>);

impl Drop for Bound {
    fn drop(&mut self) {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `bind` pushed exactly one context on this thread, and `Bound` is not Send
        // (its raw-pointer marker), so this pops it on that same thread.
        let r = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!("cuCtxPopCurrent failed: {r:?}");
        }
    }
}

/// Makes device `ordinal`'s primary context current on this thread (retaining it once) until
/// the returned guard drops.
fn bind(d: &Driver, ordinal: u32) -> Result<Bound> {
    let slot = d
        .contexts
        .get(ordinal as usize)
        .ok_or_else(|| Error::InvalidArgument(format!("no CUDA device {ordinal}")))?;
    let ctx = match slot.get() {
        Some(c) => *c,
        None => {
            let mut dev: sys::CUdevice = 0;
            // SAFETY: valid out-pointer; the ordinal is below the device count.
            check("cuDeviceGet", unsafe {
                sys::cuDeviceGet(&mut dev, ordinal as i32)
            })?;
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: valid out-pointer and device. A race retains twice, which only bumps the
            // primary context's reference count (it lives as long as the process anyway).
            check("cuDevicePrimaryCtxRetain", unsafe {
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
            })?;
            *slot.get_or_init(|| ctx as usize)
        }
    };
    // SAFETY: `ctx` is a retained primary context, never released; `Bound` pops it again.
    check("cuCtxPushCurrent", unsafe {
        sys::cuCtxPushCurrent_v2(ctx as sys::CUcontext)
    })?;
    Ok(Bound(std::marker::PhantomData))
}

fn pci_bus_id(ordinal: u32) -> Result<String> {
    let mut dev: sys::CUdevice = 0;
    // SAFETY: valid out-pointer.
    check("cuDeviceGet", unsafe {
        sys::cuDeviceGet(&mut dev, ordinal as i32)
    })?;
    let mut buf = [0 as c_char; 32];
    // SAFETY: `buf` has the length passed; the driver NUL-terminates within it.
    check("cuDeviceGetPCIBusId", unsafe {
        sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev)
    })?;
    // SAFETY: NUL-terminated by the driver (and the buffer was zeroed).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// The calling thread's current CUDA context, as an address (0: none). The library leaves
/// it as it found it: every driver call it makes runs under a pushed context that is popped
/// before it returns.
pub fn current_context() -> Result<usize> {
    let _ = driver()?;
    guarded(|| {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the call only reads this thread's context stack.
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut ctx) })?;
        Ok(ctx as usize)
    })
}

/// Says whether `[addr, addr + len)` is pageable host, pinned host or device memory, and for
/// device memory which GPU holds it.
///
/// On a host without CUDA this answers `Host` for every address (no device memory can
/// exist there). With CUDA, an address the driver does not know is pageable host memory;
/// device memory must hold the whole range within one allocation.
pub fn classify(addr: u64, len: u64) -> Result<Placement> {
    let Ok(d) = driver() else {
        return Ok(Placement::Host);
    };
    guarded(|| {
        let _ctx = bind(d, 0)?;
        let mut kind: u32 = 0;
        // SAFETY: MEMORY_TYPE writes one `CUmemorytype` (u32) into `kind`.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut kind as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                addr,
            )
        };
        if r == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            // Not an address CUDA allocated or registered: ordinary host memory.
            return Ok(Placement::Host);
        }
        check("cuPointerGetAttribute(MEMORY_TYPE)", r)?;
        if kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Ok(Placement::PinnedHost);
        }
        let mut ordinal: i32 = 0;
        // SAFETY: DEVICE_ORDINAL writes one int into `ordinal`.
        check("cuPointerGetAttribute(DEVICE_ORDINAL)", unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
        })?;
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: valid out-pointers; `addr` is device memory (checked above).
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr)
        })?;
        if addr
            .checked_add(len)
            .is_none_or(|end| end > base + size as u64)
        {
            return Err(Error::InvalidArgument(format!(
                "device range [{addr:#x}, +{len}) runs past its allocation [{base:#x}, +{size})"
            )));
        }
        Ok(Placement::Device {
            ordinal: ordinal as u32,
            pci_bus_id: pci_bus_id(ordinal as u32)?,
        })
    })
}

/// A dma-buf file descriptor exporting device memory, closed on drop.
#[derive(Debug)]
pub(crate) struct DmabufExport {
    pub(crate) fd: std::os::fd::OwnedFd,
    /// Offset of the requested address inside the exported (page-aligned) range.
    pub(crate) offset: u64,
}

/// Exports the device range `[addr, addr + len)` as a dma-buf (`cuMemGetHandleForAddressRange`
/// on the enclosing host-page-aligned range).
pub(crate) fn export_dmabuf(ordinal: u32, addr: u64, len: u64) -> Result<DmabufExport> {
    let d = driver()?;
    if !d.dmabuf_export {
        return Err(Error::CudaUnavailable {
            reason: "the driver has no cuMemGetHandleForAddressRange (CUDA 11.7+ needed)".into(),
        });
    }
    guarded(|| {
        let _ctx = bind(d, ordinal)?;
        const PAGE: u64 = 4096;
        let start = addr & !(PAGE - 1);
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE))
            .ok_or_else(|| Error::InvalidArgument("device range wraps around".into()))?;
        let mut fd: i32 = -1;
        // SAFETY: DMA_BUF_FD writes one int (the new fd) into `fd`; flags must be 0.
        check("cuMemGetHandleForAddressRange", unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut i32).cast(),
                start,
                (end - start) as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })?;
        if fd < 0 {
            return Err(Error::InvalidArgument(
                "cuMemGetHandleForAddressRange returned no fd".into(),
            ));
        }
        // SAFETY: the driver just created this fd for us; we are its only owner.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(DmabufExport {
            fd,
            offset: addr - start,
        })
    })
}

/// Page-locked host memory from `cuMemHostAlloc`, freed on drop: the fast side of staging
/// copies.
pub(crate) struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain owned allocation; pinned memory has no thread affinity.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access is read-only through `Deref`.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    fn alloc(d: &Driver, ordinal: u32, len: usize) -> Result<Self> {
        let _ctx = bind(d, ordinal)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flag 1 = CU_MEMHOSTALLOC_PORTABLE (usable from every
        // context).
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut p, len.max(1), 1)
        })?;
        Ok(PinnedBuf { ptr: p.cast(), len })
    }
}

impl std::ops::Deref for PinnedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated in `alloc`, alive as long as `self`; device copies
        // into it complete (stream synchronised) before any borrow is handed out again.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PinnedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = guarded(|| {
            // SAFETY: allocated by cuMemHostAlloc in `alloc`, freed once.
            check("cuMemFreeHost", unsafe {
                sys::cuMemFreeHost(self.ptr.cast())
            })
        });
    }
}

/// A bounce buffer for staging copies: pinned when CUDA gives one, plain heap otherwise
/// (the host-emulated device of the tests).
pub(crate) enum Bounce {
    Pinned(PinnedBuf),
    /// Only the host-emulated device of the tests makes these.
    #[cfg_attr(not(test), allow(dead_code))]
    Heap(Vec<u8>),
}

impl std::ops::Deref for Bounce {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bounce::Pinned(p) => p,
            Bounce::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Bounce {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Bounce::Pinned(p) => p,
            Bounce::Heap(v) => v,
        }
    }
}

/// Size of one staging bounce buffer: copies and socket writes go in pieces of this size.
pub(crate) const STAGE_CHUNK: usize = 4 << 20;

/// Bounce buffers kept for reuse per device.
const POOL_MAX: usize = 16;

/// Copies between device memory and host buffers, for segments registered in staging mode.
pub(crate) trait DeviceCopy: Send + Sync {
    /// Copies `dst.len()` bytes from device address `src` into `dst`.
    fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Copies `src` to device address `dst`.
    fn to_device(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies each device range `(addr, len)` of `parts`, back to back, into the start of
    /// `dst`: many small pages for one wait on the device instead of one wait each.
    fn to_host_gather(&self, parts: &[(u64, usize)], dst: &mut [u8]) -> Result<()> {
        let mut at = 0;
        for &(src, n) in parts {
            self.to_host(src, &mut dst[at..at + n])?;
            at += n;
        }
        Ok(())
    }
    /// Copies consecutive pieces of `src` to the device ranges `(addr, len)` of `parts`, in
    /// order: the other half of [`to_host_gather`](Self::to_host_gather).
    fn to_device_scatter(&self, parts: &[(u64, usize)], src: &[u8]) -> Result<()> {
        let mut at = 0;
        for &(dst, n) in parts {
            self.to_device(dst, &src[at..at + n])?;
            at += n;
        }
        Ok(())
    }
    /// A bounce buffer of [`STAGE_CHUNK`] bytes (give it back with [`recycle`](Self::recycle)).
    fn bounce(&self) -> Result<Bounce>;
    /// Returns a bounce buffer for reuse.
    fn recycle(&self, b: Bounce);
}

impl fmt::Debug for dyn DeviceCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceCopy")
    }
}

/// Staging copies on one GPU: a stream of its own and a pool of pinned bounce buffers.
pub(crate) struct CudaStaging {
    ordinal: u32,
    /// `CUstream` as an address, created once, never destroyed (lives with the process).
    stream: usize,
    /// One copy at a time on the stream: each copy is synchronised before the next starts.
    lock: Mutex<()>,
    pool: Mutex<Vec<PinnedBuf>>,
}

/// The staging copier of device `ordinal`.
pub(crate) fn staging(ordinal: u32) -> Result<Arc<CudaStaging>> {
    let d = driver()?;
    let slot = d
        .stagers
        .get(ordinal as usize)
        .ok_or_else(|| Error::InvalidArgument(format!("no CUDA device {ordinal}")))?;
    slot.get_or_init(|| {
        guarded(|| {
            let _ctx = bind(d, ordinal)?;
            let mut stream: sys::CUstream = std::ptr::null_mut();
            // SAFETY: valid out-pointer; flag 1 = CU_STREAM_NON_BLOCKING.
            check("cuStreamCreate", unsafe {
                sys::cuStreamCreate(&mut stream, 1)
            })?;
            Ok(Arc::new(CudaStaging {
                ordinal,
                stream: stream as usize,
                lock: Mutex::new(()),
                pool: Mutex::new(Vec::new()),
            }))
        })
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|reason| Error::CudaUnavailable { reason })
}

impl CudaStaging {
    fn run(
        &self,
        call: &'static str,
        f: impl FnOnce(sys::CUstream) -> sys::CUresult,
    ) -> Result<()> {
        let d = driver()?;
        guarded(|| {
            let _one = self.lock.lock();
            let _ctx = bind(d, self.ordinal)?;
            let stream = self.stream as sys::CUstream;
            let enqueued = f(stream);
            // Always wait, also when enqueueing failed part-way: copies enqueued before the
            // failure still target the bounce buffer, which the caller recycles on return.
            // SAFETY: our own live stream.
            let synced = unsafe { sys::cuStreamSynchronize(stream) };
            check(call, enqueued)?;
            check("cuStreamSynchronize", synced)
        })
    }
}

/// Whether the parts `(addr, len)` fit back to back in `len` bytes.
fn fits(parts: &[(u64, usize)], len: usize) -> bool {
    parts.iter().map(|p| p.1).sum::<usize>() <= len
}

impl CudaStaging {
    /// Enqueues `copy(offset in the bounce buffer, device address, len, stream)` for each part,
    /// stopping at the first error, then waits for the stream once.
    fn run_each(
        &self,
        call: &'static str,
        parts: &[(u64, usize)],
        copy: impl Fn(usize, u64, usize, sys::CUstream) -> sys::CUresult,
    ) -> Result<()> {
        self.run(call, |s| {
            let mut at = 0;
            for &(addr, n) in parts {
                let r = copy(at, addr, n, s);
                if r != sys::CUresult::CUDA_SUCCESS {
                    return r;
                }
                at += n;
            }
            sys::CUresult::CUDA_SUCCESS
        })
    }
}

impl DeviceCopy for CudaStaging {
    fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        let (p, n) = (dst.as_mut_ptr(), dst.len());
        self.run("cuMemcpyDtoHAsync", |s| {
            // SAFETY: `dst` is exclusively borrowed for `n` bytes until the stream is
            // synchronised in `run`; `src` lies in a registered device segment.
            unsafe { sys::cuMemcpyDtoHAsync_v2(p.cast(), src, n, s) }
        })
    }

    fn to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        let (p, n) = (src.as_ptr(), src.len());
        self.run("cuMemcpyHtoDAsync", |s| {
            // SAFETY: `src` is borrowed for `n` bytes until the stream is synchronised in
            // `run`; `dst` lies in a registered device segment.
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, p.cast(), n, s) }
        })
    }

    fn to_host_gather(&self, parts: &[(u64, usize)], dst: &mut [u8]) -> Result<()> {
        assert!(
            fits(parts, dst.len()),
            "gathered pages exceed the bounce buffer"
        );
        let base = dst.as_mut_ptr();
        self.run_each("cuMemcpyDtoHAsync", parts, |at, src, n, s| {
            // SAFETY: `dst` is exclusively borrowed and holds every part (checked above) until
            // the stream is synchronised in `run`; `src` lies in a registered device segment.
            unsafe { sys::cuMemcpyDtoHAsync_v2(base.add(at).cast(), src, n, s) }
        })
    }

    fn to_device_scatter(&self, parts: &[(u64, usize)], src: &[u8]) -> Result<()> {
        assert!(
            fits(parts, src.len()),
            "scattered pages exceed the bounce buffer"
        );
        let base = src.as_ptr();
        self.run_each("cuMemcpyHtoDAsync", parts, |at, dst, n, s| {
            // SAFETY: `src` is borrowed and holds every part (checked above) until the stream
            // is synchronised in `run`; `dst` lies in a registered device segment.
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, base.add(at).cast(), n, s) }
        })
    }

    fn bounce(&self) -> Result<Bounce> {
        if let Some(b) = self.pool.lock().pop() {
            return Ok(Bounce::Pinned(b));
        }
        let d = driver()?;
        guarded(|| PinnedBuf::alloc(d, self.ordinal, STAGE_CHUNK)).map(Bounce::Pinned)
    }

    fn recycle(&self, b: Bounce) {
        if let Bounce::Pinned(p) = b {
            let mut pool = self.pool.lock();
            if pool.len() < POOL_MAX {
                pool.push(p);
            }
        }
    }
}

/// A "device" that is host memory, copied with memcpy: drives the staging paths in tests on
/// hosts without a GPU.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct HostEmulatedDevice {
    pub(crate) copies: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl DeviceCopy for HostEmulatedDevice {
    fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: test-only; `src` is host memory of a registered segment standing in for a
        // device range, distinct from `dst`.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }
    fn to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as in `to_host`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len()) };
        Ok(())
    }
    /// One call, one counted copy: as one wait on a real device.
    fn to_host_gather(&self, parts: &[(u64, usize)], dst: &mut [u8]) -> Result<()> {
        self.copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut at = 0;
        for &(src, n) in parts {
            // SAFETY: as in `to_host`, for each part; `dst` holds them all (sliced).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src as usize as *const u8,
                    dst[at..at + n].as_mut_ptr(),
                    n,
                )
            };
            at += n;
        }
        Ok(())
    }
    fn to_device_scatter(&self, parts: &[(u64, usize)], src: &[u8]) -> Result<()> {
        self.copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut at = 0;
        for &(dst, n) in parts {
            // SAFETY: as in `to_device`, for each part; `src` holds them all (sliced).
            unsafe {
                std::ptr::copy_nonoverlapping(src[at..at + n].as_ptr(), dst as usize as *mut u8, n)
            };
            at += n;
        }
        Ok(())
    }
    fn bounce(&self) -> Result<Bounce> {
        Ok(Bounce::Heap(vec![0; STAGE_CHUNK]))
    }
    fn recycle(&self, _b: Bounce) {}
}

/// GPU memory allocated with `cuMemAlloc`, freed on drop: for examples and tests that need
/// device memory to register.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
    ordinal: u32,
}

impl DeviceBuffer {
    /// Allocates `len` bytes on GPU `ordinal`.
    pub fn alloc(ordinal: u32, len: usize) -> Result<Self> {
        let d = driver()?;
        guarded(|| {
            let _ctx = bind(d, ordinal)?;
            let mut ptr = 0u64;
            // SAFETY: valid out-pointer.
            check("cuMemAlloc", unsafe {
                sys::cuMemAlloc_v2(&mut ptr, len.max(1))
            })?;
            Ok(DeviceBuffer { ptr, len, ordinal })
        })
    }

    /// Device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: at least one byte is allocated.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    fn check_range(&self, offset: usize, n: usize) -> Result<()> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "[{offset}, +{n}) outside a device buffer of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_range(offset, src.len())?;
        staging(self.ordinal)?.to_device(self.ptr + offset as u64, src)
    }

    /// Copies bytes out of the buffer, starting at `offset`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range(offset, dst.len())?;
        staging(self.ordinal)?.to_host(self.ptr + offset as u64, dst)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = guarded(|| {
                let _ctx = bind(d, self.ordinal)?;
                // SAFETY: allocated by cuMemAlloc in `alloc`, freed once.
                check("cuMemFree", unsafe { sys::cuMemFree_v2(self.ptr) })
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI hosts have no GPU; set `KVT_TEST_GPU=1` where one is present.
    fn gpu_host() -> bool {
        std::env::var_os("KVT_TEST_GPU").is_some()
    }

    #[test]
    fn absent_driver_is_an_error_not_a_panic() {
        if gpu_host() {
            return;
        }
        let e = available().unwrap_err();
        assert_eq!(e.code(), 32);
        match &e {
            Error::CudaUnavailable { reason } => {
                assert!(reason.contains("libcuda.so.1 not found"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Asked again: same answer, still no panic.
        assert!(matches!(available(), Err(Error::CudaUnavailable { .. })));
        assert!(matches!(driver_info(), Err(Error::CudaUnavailable { .. })));
        assert!(matches!(
            dmabuf_export_supported(),
            Err(Error::CudaUnavailable { .. })
        ));
        assert!(matches!(
            DeviceBuffer::alloc(0, 4096),
            Err(Error::CudaUnavailable { .. })
        ));
        assert!(matches!(
            export_dmabuf(0, 0x1000, 4096),
            Err(Error::CudaUnavailable { .. })
        ));
        assert!(matches!(staging(0), Err(Error::CudaUnavailable { .. })));
    }

    #[test]
    fn host_memory_classifies_as_host() {
        let heap = vec![7u8; 1 << 16];
        let stack = [0u8; 256];
        let engine_alloc = crate::memory::raw::RawAlloc::zeroed(1 << 20).unwrap();
        use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
        let len = std::num::NonZeroUsize::new(1 << 20).unwrap();
        // SAFETY: a fresh private anonymous mapping, unmapped below and never dereferenced.
        let map = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        for (what, addr, len) in [
            ("heap", heap.as_ptr() as u64, heap.len() as u64),
            ("stack", stack.as_ptr() as u64, stack.len() as u64),
            ("mmap", map.as_ptr() as u64, 1 << 20),
            ("engine allocation", engine_alloc.addr(), 1 << 20),
            // Not even mapped: without CUDA nothing can be device memory.
            ("unmapped", 0x10, 16),
        ] {
            let p = classify(addr, len).unwrap();
            assert_eq!(p, Placement::Host, "{what}");
            assert!(!p.is_device());
        }
        // SAFETY: the mapping made above, unmapped once.
        unsafe { munmap(map, 1 << 20) }.unwrap();
    }

    #[test]
    fn panics_inside_become_cuda_unavailable() {
        let r: Result<()> = guarded(|| panic!("Unable to dynamically load the \"cuda\" library"));
        match r {
            Err(Error::CudaUnavailable { reason }) => {
                assert!(reason.contains("Unable to dynamically load"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cuda_errors_carry_call_and_name() {
        let e = check("cuInit", sys::CUresult::CUDA_ERROR_NO_DEVICE).unwrap_err();
        assert_eq!(e.code(), 33);
        assert_eq!(e.to_string(), "cuInit failed: CUDA_ERROR_NO_DEVICE (100)");
        assert!(check("cuInit", sys::CUresult::CUDA_SUCCESS).is_ok());
    }

    #[test]
    fn write_visibility_follows_the_device_attributes() {
        use WriteVisibility::*;
        // Ordering to the owner or to every device: nothing to do, flush or not.
        assert_eq!(WriteVisibility::of(100, 1, true), Ordered);
        assert_eq!(WriteVisibility::of(200, 0, false), Ordered);
        // No ordering: the host-side flush, where the driver has it and offers it.
        assert_eq!(WriteVisibility::of(0, 1, true), Flush);
        assert_eq!(WriteVisibility::of(0, 3, true), Flush);
        assert_eq!(WriteVisibility::of(0, 1, false), Unforced);
        // Only the stream-memop option: not a host flush.
        assert_eq!(WriteVisibility::of(0, 2, true), Unforced);
        assert_eq!(WriteVisibility::of(0, 0, true), Unforced);
    }

    #[test]
    fn write_visibility_without_a_driver_is_cuda_unavailable() {
        if available().is_ok() {
            return; // a GPU host: scripts/gpu-check.sh checks the real answer
        }
        assert!(matches!(
            write_visibility(0),
            Err(Error::CudaUnavailable { .. })
        ));
        assert!(matches!(
            flush_rdma_writes(0),
            Err(Error::CudaUnavailable { .. })
        ));
    }

    #[test]
    fn placement_display() {
        assert_eq!(Placement::Host.to_string(), "host");
        let p = Placement::Device {
            ordinal: 1,
            pci_bus_id: "0000:3B:00.0".into(),
        };
        assert_eq!(p.to_string(), "GPU 1 (0000:3B:00.0)");
        assert!(p.is_device());
    }
}
