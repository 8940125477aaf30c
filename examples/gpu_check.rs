//! The Rust half of `scripts/gpu-check.sh`: what the CUDA driver says about memory, and how
//! GPU memory is registered. Prints one `CHECK <name> | PASS|FAIL|SKIP | <detail>` line per
//! check and exits 1 if any failed, 2 where CUDA is unavailable.
//!
//! ```text
//! cargo run --release --example gpu_check
//! ```

use std::process::ExitCode;

use kvtransfer::cuda::{self, DeviceBuffer};
use kvtransfer::{EngineConfig, GpuMode, RegMode, TransferEngine, TransportKind};

struct Report {
    failed: bool,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("CHECK {name} | PASS | {detail}"),
            Err(detail) => {
                self.failed = true;
                println!("CHECK {name} | FAIL | {detail}");
            }
        }
    }
}

fn engine(transport: TransportKind, mode: Option<GpuMode>) -> kvtransfer::Result<TransferEngine> {
    let mut b = EngineConfig::builder().transport(transport);
    if let Some(m) = mode {
        b = b.gpu_mode(m);
    }
    TransferEngine::new(b.build()?)
}

fn main() -> ExitCode {
    if let Err(e) = cuda::available() {
        println!("CHECK cuda available | SKIP | {e}");
        return ExitCode::from(2);
    }
    let mut r = Report { failed: false };
    r.check(
        "cuda driver",
        cuda::driver_info()
            .map(|(version, devices)| format!("driver API {version}, {devices} device(s)"))
            .map_err(|e| e.to_string()),
    );

    // The caller's thread keeps its own CUDA context: a fresh thread has none, and after the
    // library allocated, classified, registered and staged GPU memory it still has none.
    r.check(
        "caller's context kept",
        std::thread::spawn(|| -> Result<String, String> {
            let before = cuda::current_context().map_err(|e| e.to_string())?;
            let d = DeviceBuffer::alloc(0, 1 << 20).map_err(|e| e.to_string())?;
            cuda::classify(d.addr(), d.len() as u64).map_err(|e| e.to_string())?;
            d.write(0, &[7u8; 4096]).map_err(|e| e.to_string())?;
            let e = engine(TransportKind::Tcp, None).map_err(|e| e.to_string())?;
            // SAFETY: `d` outlives the engine (dropped after it, at the end of the closure).
            unsafe { e.register_memory(d.addr() as usize as *mut u8, d.len()) }
                .map_err(|e| e.to_string())?;
            drop(e);
            let after = cuda::current_context().map_err(|e| e.to_string())?;
            if before == after {
                Ok(format!("current context {before:#x} before and after"))
            } else {
                Err(format!(
                    "current context was {before:#x}, is {after:#x} after our calls"
                ))
            }
        })
        .join()
        .unwrap_or_else(|_| Err("the check's thread panicked".into())),
    );

    // Pointer classification: device memory, ordinary host memory.
    let dev = match DeviceBuffer::alloc(0, 64 << 20) {
        Ok(d) => d,
        Err(e) => {
            println!("CHECK cuMemAlloc | FAIL | {e}");
            return ExitCode::FAILURE;
        }
    };
    r.check(
        "classify device",
        match cuda::classify(dev.addr(), dev.len() as u64) {
            Ok(p) if p.is_device() => Ok(format!("{p}")),
            Ok(p) => Err(format!("cuMemAlloc memory classified as {p}")),
            Err(e) => Err(e.to_string()),
        },
    );
    let host = vec![0u8; 1 << 20];
    r.check(
        "classify host",
        match cuda::classify(host.as_ptr() as u64, host.len() as u64) {
            Ok(p) if !p.is_device() => Ok(format!("{p}")),
            Ok(p) => Err(format!("malloc memory classified as {p}")),
            Err(e) => Err(e.to_string()),
        },
    );

    // GPUDirect RDMA write visibility: what the device needs before a room may report
    // Success, and the flush itself where it needs one.
    r.check(
        "rdma write visibility",
        cuda::flush_rdma_writes(0)
            .map(|v| match v {
                cuda::WriteVisibility::Ordered => {
                    "GPU 0 orders GPUDirect RDMA writes itself: no flush before Success".into()
                }
                cuda::WriteVisibility::Flush => {
                    "GPU 0 needs a flush: cuFlushGPUDirectRDMAWrites ran".into()
                }
                cuda::WriteVisibility::Unforced => {
                    "GPU 0's driver offers neither ordering nor a flush (warned)".into()
                }
            })
            .map_err(|e| e.to_string()),
    );

    // Registration: over TCP GPU memory is always staged; register_memory classifies itself.
    r.check(
        "register on tcp",
        (|| {
            let e = engine(TransportKind::Tcp, None).map_err(|e| e.to_string())?;
            // SAFETY: `dev` outlives the engine (dropped at the end of main).
            let s = unsafe { e.register_memory(dev.addr() as usize as *mut u8, dev.len()) }
                .map_err(|e| e.to_string())?;
            let d = e.segment_info(s.id).map_err(|e| e.to_string())?;
            match d.mode {
                RegMode::Staging => Ok(format!("{} as {}", d.placement, d.mode)),
                other => Err(format!("registered as {other}, expected staging over TCP")),
            }
        })(),
    );

    // Mode choice and fallback need RDMA: dmabuf, then peermem, then staging.
    match engine(TransportKind::Rdma, None) {
        Err(e) => println!("CHECK register on rdma | SKIP | no RDMA engine here: {e}"),
        Ok(e) => {
            // SAFETY: `dev` outlives the engine.
            let got = unsafe { e.register_device_memory(dev.addr(), dev.len()) }
                .and_then(|s| e.segment_info(s.id));
            r.check(
                "register on rdma",
                got.map(|d| format!("{} as {} on rails {:?}", d.placement, d.mode, d.rails))
                    .map_err(|e| e.to_string()),
            );
            // A directly written segment now exists (unless it fell back to staging).
            r.check(
                "flush gpu writes",
                e.flush_gpu_writes()
                    .map(|n| format!("{n} GPU(s) flushed"))
                    .map_err(|e| e.to_string()),
            );
            for mode in [GpuMode::Dmabuf, GpuMode::Peermem, GpuMode::Staging] {
                let forced = engine(TransportKind::Rdma, Some(mode)).and_then(|e| {
                    // SAFETY: `dev` outlives the engine.
                    let s = unsafe { e.register_device_memory(dev.addr(), dev.len()) }?;
                    e.segment_info(s.id)
                });
                // A forced mode may be refused (no nvidia-peermem, say): that is reported,
                // not a failure, as long as the error says why.
                match forced {
                    Ok(d) => println!("CHECK forced {mode:?} | PASS | registered as {}", d.mode),
                    Err(e) => println!("CHECK forced {mode:?} | SKIP | refused: {e}"),
                }
            }
        }
    }
    if r.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
