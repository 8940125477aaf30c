//! Fuzzes the KV control-channel codec with arbitrary peer bytes: the length prefix
//! (`decode_len` on the first four bytes), the body that follows it as a channel reads it, and
//! the whole input as a body.
#![no_main]

use kvtransfer::kv::proto::{KvMessage, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

/// Whatever decodes re-encodes to the same bytes, and those decode to the same message.
fn check_canonical(body: &[u8]) {
    if let Ok(msg) = KvMessage::decode(body) {
        let bytes = msg.encode();
        let prefix: [u8; 4] = bytes[..4].try_into().expect("length prefix");
        assert_eq!(KvMessage::decode_len(prefix), Ok(bytes.len() - 4));
        assert_eq!(&bytes[4..], body, "{msg:?} re-encodes differently");
        assert_eq!(KvMessage::decode(&bytes[4..]).as_ref(), Ok(&msg));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((prefix, rest)) = data.split_first_chunk::<4>() {
        if let Ok(len) = KvMessage::decode_len(*prefix) {
            assert!((1..=MAX_MESSAGE).contains(&len), "length {len} accepted");
            if let Some(body) = rest.get(..len) {
                check_canonical(body);
            }
        }
    }
    check_canonical(data);
});
