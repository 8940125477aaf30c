//! GPU memory on a host without CUDA (CI): clear errors, host placement, no panics. Set
//! `KVT_TEST_GPU=1` on a GPU host to skip the absence checks.

use std::path::PathBuf;
use std::process::Command;

use kvtransfer::cuda::{self, Placement};
use kvtransfer::{
    EngineConfig, Error, GpuMode, MemoryKind, RegMode, TransferEngine, TransportKind,
};

fn gpu_host() -> bool {
    std::env::var_os("KVT_TEST_GPU").is_some()
}

fn engine(mode: GpuMode) -> TransferEngine {
    let c = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .gpu_mode(mode)
        .build()
        .unwrap();
    TransferEngine::new(c).unwrap()
}

#[test]
fn cuda_absent_is_a_clear_error() {
    if gpu_host() {
        return;
    }
    let e = cuda::available().unwrap_err();
    assert_eq!(e.code(), 32);
    assert!(
        e.to_string()
            .starts_with("CUDA unavailable: libcuda.so.1 not found"),
        "{e}"
    );
    let b = cuda::DeviceBuffer::alloc(0, 1 << 20).unwrap_err();
    assert!(matches!(b, Error::CudaUnavailable { .. }), "{b:?}");
}

#[test]
fn host_memory_registers_as_host_whatever_the_gpu_mode() {
    for mode in [
        GpuMode::Auto,
        GpuMode::Dmabuf,
        GpuMode::Peermem,
        GpuMode::Staging,
    ] {
        let e = engine(mode);
        let mut mem = vec![0u8; 1 << 16];
        // SAFETY: `mem` outlives the registration (unregistered below).
        let info = unsafe { e.register_memory(mem.as_mut_ptr(), mem.len()) }.unwrap();
        assert_eq!(info.kind, MemoryKind::Host);
        let d = e.segment_info(info.id).unwrap();
        assert_eq!(d.mode, RegMode::Host, "{mode:?}");
        assert_eq!(d.placement, Placement::Host);
        assert!(d.rails.is_empty(), "TCP has no rails");
        assert_eq!(d.info, info);
        e.unregister_memory(info.id).unwrap();
        assert!(matches!(
            e.segment_info(info.id),
            Err(Error::UnknownSegment { .. })
        ));
        // An engine allocation is host memory too.
        let buf = e.alloc(4096).unwrap();
        assert_eq!(e.segment_info(buf.segment()).unwrap().mode, RegMode::Host);
    }
}

/// Without GPU memory written directly by the NIC there is nothing to make visible: no CUDA
/// call is made (on a host without CUDA one would fail with `CudaUnavailable`).
#[test]
fn an_engine_without_direct_gpu_segments_flushes_nothing() {
    let e = engine(GpuMode::Auto);
    let buf = e.alloc(1 << 20).unwrap();
    let mut host = vec![0u8; 1 << 16];
    // SAFETY: `host` outlives the engine's use of it (unregistered below).
    let seg = unsafe { e.register_memory(host.as_mut_ptr(), host.len()) }.unwrap();
    assert_eq!(e.flush_gpu_writes().unwrap(), 0);
    e.unregister_memory(seg.id).unwrap();
    drop(buf);
}

#[test]
fn device_registration_without_cuda_fails_with_code_32() {
    if gpu_host() {
        return;
    }
    let e = engine(GpuMode::Auto);
    let mut mem = vec![0u8; 4096];
    // SAFETY: nothing is registered (the call fails first).
    let err = unsafe { e.register_device_memory(mem.as_mut_ptr() as u64, mem.len()) }.unwrap_err();
    assert_eq!(err.code(), 32, "{err}");
    assert!(e.segments().is_empty());
}

fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo_profile = if name == "debug" { "dev" } else { name };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--example",
            "gpu_staging",
            "--profile",
            cargo_profile,
        ])
        .arg("--target-dir")
        .arg(profile.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building the gpu_staging example failed");
    profile.join("examples").join("gpu_staging")
}

#[test]
fn gpu_staging_example_says_cuda_is_unavailable() {
    if gpu_host() {
        return;
    }
    let out = Command::new(example_binary()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("gpu_staging: CUDA unavailable: libcuda.so.1 not found"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
