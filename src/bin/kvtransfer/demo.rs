//! `kvtransfer demo`: a prefill engine hands a synthetic DeepSeek-V3-shaped KV cache to a
//! decode engine in the same process, then every byte is checked.

use std::time::Instant;

use clap::Args;
use kvtransfer::{EngineConfig, Request, Result, TransferEngine};

/// Demo options.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Model layers (DeepSeek-V3: 61).
    #[arg(long, default_value_t = 61)]
    layers: usize,
    /// Pages moved per layer (256 pages x 32 tokens = 8K tokens).
    #[arg(long, default_value_t = 256)]
    pages: usize,
    /// Bytes of one page of one layer (MLA bf16, 32 tokens: 36 KiB).
    #[arg(long, default_value_t = 36 * 1024)]
    page_bytes: usize,
    /// Transfers to run (the first warms up).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Destination page for each source page: runs of 1..8 contiguous pages at scattered places,
/// the way a paged KV allocator hands them out.
fn destination_pages(pages: usize, pool: usize) -> Vec<usize> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut free: Vec<usize> = (0..pool).collect();
    let mut out = Vec::with_capacity(pages);
    while out.len() < pages {
        let run = (1 + next() % 8) as usize;
        let start = (next() % free.len() as u64) as usize;
        let mut taken = 0;
        while taken < run && start + taken < free.len() && out.len() < pages {
            out.push(free[start + taken]);
            taken += 1;
        }
        free.drain(start..start + taken);
    }
    out
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    let config = EngineConfig::from_env()?;
    let decode = TransferEngine::new(config.clone())?;
    let prefill = TransferEngine::new(config)?;
    let pool = a.pages + a.pages / 4;
    let layer_bytes = pool * a.page_bytes;
    let total = a.layers * a.pages * a.page_bytes;
    println!(
        "kvtransfer demo: {} layers x {} pages x {} KiB = {:.1} MiB per request, transport {}",
        a.layers,
        a.pages,
        a.page_bytes / 1024,
        total as f64 / (1 << 20) as f64,
        prefill.transport()
    );
    let src = prefill.alloc(a.layers * layer_bytes)?;
    let dst = decode.alloc(a.layers * layer_bytes)?;
    // Fill the prefill KV cache with bytes that differ per layer, page and offset.
    let mut page = vec![0u8; a.page_bytes];
    for l in 0..a.layers {
        for p in 0..a.pages {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i as u32 ^ (p as u32).wrapping_mul(2_654_435_761) ^ (l as u32) << 24)
                    .to_le_bytes()[i % 4];
            }
            src.write(l * layer_bytes + p * a.page_bytes, &page);
        }
    }
    let dst_pages = destination_pages(a.pages, pool);
    let mut requests = Vec::with_capacity(a.layers * a.pages);
    for l in 0..a.layers {
        for (p, &d) in dst_pages.iter().enumerate() {
            requests.push(Request::write(
                src.addr() + (l * layer_bytes + p * a.page_bytes) as u64,
                a.page_bytes as u64,
                dst.segment(),
                (l * layer_bytes + d * a.page_bytes) as u64,
            ));
        }
    }
    let peer = prefill.connect(decode.local_addr())?;
    let mut best = f64::MAX;
    for round in 0..a.rounds.max(1) {
        let t = Instant::now();
        prefill.transfer_sync(peer, &requests)?;
        let secs = t.elapsed().as_secs_f64();
        best = best.min(secs);
        println!(
            "round {}: {} writes, {:.1} MiB in {:.2} ms = {:.2} GB/s",
            round + 1,
            requests.len(),
            total as f64 / (1 << 20) as f64,
            secs * 1e3,
            total as f64 / secs / 1e9
        );
    }
    // Verify every page of every layer.
    let (mut want, mut got) = (vec![0u8; a.page_bytes], vec![0u8; a.page_bytes]);
    for l in 0..a.layers {
        for (p, &d) in dst_pages.iter().enumerate() {
            src.read(l * layer_bytes + p * a.page_bytes, &mut want);
            dst.read(l * layer_bytes + d * a.page_bytes, &mut got);
            if want != got {
                return Err(kvtransfer::Error::BatchFailed {
                    batch: 0,
                    reason: format!(
                        "verification failed: layer {l} page {p} (destination page {d}) differs"
                    ),
                });
            }
        }
    }
    println!(
        "verified {} pages x {} layers byte for byte; best {:.2} GB/s",
        a.pages,
        a.layers,
        total as f64 / best / 1e9
    );
    Ok(())
}
