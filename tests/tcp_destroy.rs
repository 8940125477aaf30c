//! Destroying an engine stops it: once `drop(TransferEngine)` returns, no library thread
//! writes the memory it had registered, even while a peer was streaming writes into it. The
//! test unmaps that memory and at once maps fresh memory at the same address (as an allocator
//! reuses it), then checks that the fresh memory never changes.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use kvtransfer::{EngineConfig, Request, TransferEngine, TransportKind};

const LEN: usize = 4 << 20;
const BLOCK: u64 = 256 << 10;

fn engine() -> TransferEngine {
    let cfg = EngineConfig::builder()
        .transport(TransportKind::Tcp)
        .batch_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    TransferEngine::new(cfg).unwrap()
}

/// Anonymous memory: `LEN` bytes, or exactly at `at` (replacing what is mapped there).
fn map(at: Option<*mut u8>) -> *mut u8 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | at.map_or(0, |_| libc::MAP_FIXED);
    // SAFETY: an anonymous private mapping; with MAP_FIXED it replaces our own mapping at `at`,
    // which no Rust reference points into.
    let p = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |p| p.cast()),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

/// Whether any byte of the `LEN` bytes at `p` is not zero (read with volatile loads: the
/// library could write them from another thread).
fn any_written(p: *const u8) -> Option<usize> {
    // SAFETY: `p` is a live mapping of LEN bytes owned by the test.
    (0..LEN).find(|&i| unsafe { std::ptr::read_volatile(p.add(i)) } != 0)
}

#[test]
fn no_write_lands_after_destroy_returns() {
    let initiator = engine();
    let src = initiator.alloc(LEN).unwrap();
    src.write(0, &vec![0xA5; LEN]);
    for round in 0..100 {
        let target = engine();
        let mem = map(None);
        // SAFETY: `mem` stays mapped until after the engine that registered it is dropped.
        let seg = unsafe { target.register_memory(mem, LEN) }.unwrap();
        let peer = initiator.connect(target.local_addr()).unwrap();
        let reqs: Vec<Request> = (0..LEN as u64 / BLOCK)
            .map(|i| Request::write(src.addr() + i * BLOCK, BLOCK, seg.id, i * BLOCK))
            .collect();
        let (first_done, landed) = mpsc::channel();
        let stream = thread::scope(|s| {
            let streamer = s.spawn(|| {
                // Batches back to back until the target is gone.
                let mut ok = 0u32;
                loop {
                    let batch = match initiator.submit(peer, &reqs) {
                        Ok(b) => b,
                        Err(_) => return ok,
                    };
                    if initiator.wait(batch).is_err() {
                        return ok;
                    }
                    ok += 1;
                    if ok == 1 {
                        let _ = first_done.send(());
                    }
                }
            });
            // Destroy while writes are streaming in.
            landed
                .recv_timeout(Duration::from_secs(10))
                .expect("a first batch landed");
            drop(target);
            // The memory is released at once and fresh memory appears at the same address.
            let fresh = map(Some(mem));
            assert_eq!(fresh, mem);
            let batches = streamer.join().unwrap();
            // The initiator has seen the end of the stream; whatever it had in flight is gone.
            (fresh, batches)
        });
        let (fresh, batches) = stream;
        assert!(batches >= 1);
        if let Some(at) = any_written(fresh) {
            panic!("round {round}: byte {at} of the fresh memory was written after destroy");
        }
        initiator.disconnect(peer).ok();
        // SAFETY: our mapping, no longer registered anywhere.
        unsafe { libc::munmap(fresh.cast(), LEN) };
    }
}
