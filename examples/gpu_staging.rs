//! Moves KV pages GPU → TCP loopback → GPU through host staging, verifies them, prints GB/s.
//!
//! Two engines in one process (a "prefill" and a "decode" side), each with a KV pool in GPU
//! memory. The prefill pool is filled with a known pattern; pages are written to scattered
//! destination pages of the decode pool over TCP (staged through pinned bounce buffers on
//! both ends), then the decode pool is read back to the host and checked page by page.
//!
//! ```text
//! cargo run --release --example gpu_staging -- [pages=256] [page_bytes=36864] [rounds=5]
//! ```
//! Exits with status 2 and "CUDA unavailable (...)" where there is no usable GPU.

use std::process::ExitCode;
use std::time::Instant;

use kvtransfer::cuda::{self, DeviceBuffer};
use kvtransfer::{EngineConfig, Request, TransferEngine, TransportKind};

fn pattern(page: usize, page_bytes: usize) -> Vec<u8> {
    (0..page_bytes)
        .map(|i| (i as u8) ^ (page as u8).wrapping_mul(37) ^ (page >> 8) as u8)
        .collect()
}

fn main() -> ExitCode {
    if let Err(e) = cuda::available() {
        eprintln!("gpu_staging: {e}; this example needs an NVIDIA GPU and driver");
        return ExitCode::from(2);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_staging: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> kvtransfer::Result<()> {
    kvtransfer::init_logging("info");
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let mut next = |default| args.next().and_then(|r| r.ok()).unwrap_or(default);
    let (pages, page_bytes, rounds) = (next(256), next(36 * 1024), next(5));
    let len = pages * page_bytes;
    let config = || {
        EngineConfig::builder()
            .transport(TransportKind::Tcp)
            .build()
    };
    let decode = TransferEngine::new(config()?)?;
    let prefill = TransferEngine::new(config()?)?;
    let src = DeviceBuffer::alloc(0, len)?;
    let dst = DeviceBuffer::alloc(0, len)?;
    for p in 0..pages {
        src.write(p * page_bytes, &pattern(p, page_bytes))?;
    }
    // SAFETY: both device buffers outlive the engines' use of them (dropped after).
    let s = unsafe { prefill.register_device_memory(src.addr(), len) }?;
    // SAFETY: as above.
    let d = unsafe { decode.register_device_memory(dst.addr(), len) }?;
    for (side, e, id) in [("prefill", &prefill, s.id), ("decode", &decode, d.id)] {
        let info = e.segment_info(id)?;
        println!(
            "{side}: segment {} on {} registered as {}",
            id, info.placement, info.mode
        );
    }
    let peer = prefill.connect(decode.local_addr())?;
    // Page p goes to destination page (p * 7 + 3) % pages: scattered, as a decode pool is.
    let dest = |p: usize| (p * 7 + 3) % pages;
    assert!(pages % 7 != 0, "pages must not be a multiple of 7");
    let reqs: Vec<Request> = (0..pages)
        .map(|p| {
            Request::write(
                src.addr() + (p * page_bytes) as u64,
                page_bytes as u64,
                d.id,
                (dest(p) * page_bytes) as u64,
            )
        })
        .collect();
    let start = Instant::now();
    for _ in 0..rounds {
        prefill.transfer_sync(peer, &reqs)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut got = vec![0u8; page_bytes];
    for p in 0..pages {
        dst.read(dest(p) * page_bytes, &mut got)?;
        if got != pattern(p, page_bytes) {
            return Err(kvtransfer::Error::InvalidArgument(format!(
                "page {p} differs at its destination page {}",
                dest(p)
            )));
        }
    }
    let bytes = (len * rounds) as f64;
    println!(
        "{pages} pages x {page_bytes} B x {rounds} rounds GPU -> TCP loopback -> GPU: verified, \
         {:.2} GB/s",
        bytes / secs / 1e9
    );
    drop((prefill, decode));
    Ok(())
}
