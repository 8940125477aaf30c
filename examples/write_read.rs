//! The README's example: two engines, one write, read back and checked.
//!
//! `cargo run --example write_read`

use kvtransfer::{EngineConfig, Request, TransferEngine};

fn main() -> kvtransfer::Result<()> {
    let target = TransferEngine::new(EngineConfig::default())?; // decode side
    let initiator = TransferEngine::new(EngineConfig::default())?; // prefill side
    let dst = target.alloc(1 << 20)?;
    let src = initiator.alloc(1 << 20)?;
    src.write(0, b"kv bytes");
    let peer = initiator.connect(target.local_addr())?;
    let batch = initiator.submit(peer, &[Request::write(src.addr(), 8, dst.segment(), 0)])?;
    initiator.wait(batch)?;

    let back = initiator.alloc(8)?;
    initiator.transfer_sync(peer, &[Request::read(back.addr(), 8, dst.segment(), 0)])?;
    let mut out = [0u8; 8];
    back.read(0, &mut out);
    assert_eq!(&out, b"kv bytes");
    println!(
        "wrote and read back {:?} via {}",
        String::from_utf8_lossy(&out),
        initiator.transport()
    );
    Ok(())
}
