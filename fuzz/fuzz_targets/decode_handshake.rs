//! Fuzzes the handshake's small messages and the responder's state machine with arbitrary
//! peer bytes: nothing panics, and what decodes re-encodes to the same bytes.
#![no_main]

use kvtransfer::wire::{
    MAX_HELLO_BODY, MsgKind, PREAMBLE_LEN, Responder, Secret, Step, decode_hi, decode_proof,
    decode_refusal, encode_hi, encode_proof, encode_refusal, next_message,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hi) = decode_hi(data) {
        assert_eq!(&encode_hi(&hi)[PREAMBLE_LEN..], data);
    }
    if let Ok(proof) = decode_proof(data) {
        assert_eq!(&encode_proof(&proof)[PREAMBLE_LEN..], data);
    }
    if let Ok(r) = decode_refusal(data) {
        let again = encode_refusal(&r);
        assert_eq!(decode_refusal(&again[PREAMBLE_LEN..]).map(|x| x.code), Ok(r.code));
    }
    // A responder fed the bytes as a stream of messages, with and without a secret.
    for secret in [None, Some(Secret::new(b"0123456789abcdef").unwrap())] {
        let mut r = Responder::new(secret, [7; 32]);
        let mut rest = data;
        while let Ok(Some((kind, body, used))) = next_message(rest, r.expects(), MAX_HELLO_BODY) {
            let step = r.on_message(kind, body);
            rest = &rest[used..];
            match step {
                Ok(Step::Send(_)) => {}
                Ok(Step::Answer(_)) | Ok(Step::Refuse(..)) | Err(_) => break,
                Ok(Step::Done(_)) => unreachable!("a responder is never done"),
            }
            assert!(kind != MsgKind::Hello || r.expects().is_empty());
        }
    }
});
