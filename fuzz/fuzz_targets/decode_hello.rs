//! Fuzzes the handshake and segment-list decoders with arbitrary peer bytes.
#![no_main]

use kvtransfer::wire::{
    decode_hello, decode_hello_body, decode_segments, encode_hello, encode_segments,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = decode_hello(data) {
        let bytes = encode_hello(&hello);
        assert_eq!(decode_hello(&bytes).as_ref(), Ok(&hello));
        // The encoding is canonical: what decodes re-encodes to the same bytes.
        assert_eq!(bytes, data);
    }
    if let Ok(hello) = decode_hello_body(data) {
        let bytes = encode_hello(&hello);
        assert_eq!(decode_hello(&bytes).as_ref(), Ok(&hello));
    }
    if let Ok(segments) = decode_segments(data) {
        let mut bytes = Vec::new();
        encode_segments(&segments, &mut bytes);
        assert_eq!(decode_segments(&bytes).as_ref(), Ok(&segments));
        assert_eq!(bytes, data);
    }
});
