//! `kvtransfer demo`: a prefill KV manager hands a synthetic DeepSeek-V3-shaped KV cache to a
//! decode KV manager in the same process, one room per round through the KVPoll state
//! machine, then every byte is checked.

use std::time::Instant;

use clap::Args;
use kvtransfer::kv::{KvConfig, KvManager, KvPoll, KvReceiver, KvRole, KvSender};
use kvtransfer::{EngineConfig, Result};

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
    /// Also print both engines' metrics in the Prometheus text format.
    #[arg(long)]
    metrics_text: bool,
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
    // The decode server's page pool is larger than one request, so destination pages scatter.
    let pool = (a.pages + a.pages / 4) as u64;
    let page = a.page_bytes as u64;
    let layers = vec![(pool, page); a.layers];
    let aux = [(16u64, 128u64)];
    let prefill = KvManager::with_owned_memory(
        config.clone(),
        KvConfig::new(KvRole::Prefill),
        &layers,
        &aux,
    )?;
    let decode =
        KvManager::with_owned_memory(config, KvConfig::new(KvRole::Decode), &layers, &aux)?;
    let total = a.layers * a.pages * a.page_bytes;
    println!(
        "kvtransfer demo: {} layers x {} pages x {} KiB = {:.1} MiB per request, transport {}",
        a.layers,
        a.pages,
        a.page_bytes / 1024,
        total as f64 / (1 << 20) as f64,
        prefill.engine().transport()
    );
    // Fill the prefill KV cache with bytes that differ per layer, page and offset.
    let mut bytes = vec![0u8; a.page_bytes];
    for l in 0..a.layers {
        let buf = prefill.buffer(l).expect("owned buffer");
        for p in 0..pool as usize {
            fill_page(&mut bytes, l, p);
            buf.write(p * a.page_bytes, &bytes);
        }
    }
    prefill
        .aux_buffer(0)
        .expect("aux")
        .write(3 * 128, &[0xa5; 128]);
    let src: Vec<i32> = (0..a.pages as i32).collect();
    let dst: Vec<i32> = destination_pages(a.pages, pool as usize)
        .into_iter()
        .map(|p| p as i32)
        .collect();
    let mut best = f64::MAX;
    for round in 0..a.rounds.max(1) {
        let room = round as u64 + 1;
        let t = Instant::now();
        // Decode: names where the room's pages go. Prefill: sends them in 4 chunks.
        let receiver = KvReceiver::new(&decode, prefill.bootstrap_addr(), room)?;
        receiver.init(&dst, Some(5))?;
        let sender = KvSender::new(&prefill, room)?;
        sender.init(a.pages, Some(3))?;
        wait(
            || sender.poll(),
            KvPoll::WaitingForInput,
            || sender.failure_reason(),
        )?;
        let sent = Instant::now();
        let chunk = a.pages.div_ceil(4).max(1);
        for (i, c) in src.chunks(chunk).enumerate() {
            sender.send(c, (i + 1) * chunk >= a.pages)?;
        }
        wait(
            || receiver.poll(),
            KvPoll::Success,
            || receiver.failure_reason(),
        )?;
        let secs = sent.elapsed().as_secs_f64();
        wait(
            || sender.poll(),
            KvPoll::Success,
            || sender.failure_reason(),
        )?;
        best = best.min(secs);
        let m = sender.metrics();
        println!(
            "room {room}: {} page-layers as {} writes, {:.1} MiB in {:.2} ms = {:.2} GB/s (room set-up {:.2} ms)",
            a.layers * a.pages,
            m.slices,
            total as f64 / (1 << 20) as f64,
            secs * 1e3,
            total as f64 / secs / 1e9,
            (sent - t).as_secs_f64() * 1e3
        );
    }
    // Verify every page of every layer, and the aux slot.
    let mut got = vec![0u8; a.page_bytes];
    for l in 0..a.layers {
        let buf = decode.buffer(l).expect("owned buffer");
        for (&s, &d) in src.iter().zip(&dst) {
            fill_page(&mut bytes, l, s as usize);
            buf.read(d as usize * a.page_bytes, &mut got);
            if bytes != got {
                return Err(kvtransfer::Error::BatchFailed {
                    batch: 0,
                    reason: format!(
                        "verification failed: layer {l} page {s} (destination page {d}) differs"
                    ),
                });
            }
        }
    }
    let mut aux_got = [0u8; 128];
    decode
        .aux_buffer(0)
        .expect("aux")
        .read(5 * 128, &mut aux_got);
    if aux_got != [0xa5; 128] {
        return Err(kvtransfer::Error::InvalidArgument(
            "verification failed: aux slot differs".into(),
        ));
    }
    println!(
        "verified {} pages x {} layers and the aux slot byte for byte; best {:.2} GB/s",
        a.pages,
        a.layers,
        total as f64 / best / 1e9
    );
    for (who, m) in [("prefill", &prefill), ("decode", &decode)] {
        println!("{}", crate::report::summary(who, &m.engine().metrics()));
        if a.metrics_text {
            print!("{}", m.engine().metrics_text());
        }
    }
    // The sending side shuts down first, so no connection sees its peer vanish.
    drop(prefill);
    Ok(())
}

/// The demo's source bytes for `page` of `layer`.
fn fill_page(out: &mut [u8], layer: usize, page: usize) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i as u32 ^ (page as u32).wrapping_mul(2_654_435_761) ^ (layer as u32) << 24)
            .to_le_bytes()[i % 4];
    }
}

/// Polls a room until it reaches `want` (or fails, or 60 s pass).
fn wait(
    poll: impl Fn() -> KvPoll,
    want: KvPoll,
    reason: impl Fn() -> Option<String>,
) -> Result<()> {
    let until = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = poll();
        if s == want || (want != KvPoll::Success && s > want) {
            return Ok(());
        }
        if s == KvPoll::Failed || Instant::now() > until {
            return Err(kvtransfer::Error::RoomFailed {
                room: 0,
                reason: reason().unwrap_or_else(|| format!("no {} within 60 s", want.as_str())),
            });
        }
        std::thread::yield_now();
    }
}
