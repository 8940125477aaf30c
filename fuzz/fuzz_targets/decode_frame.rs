//! Fuzzes the data-frame header decoder with arbitrary peer bytes.
#![no_main]

use kvtransfer::wire::{FRAME_HEADER_LEN, FrameHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((header, _)) = data.split_first_chunk::<FRAME_HEADER_LEN>() {
        if let Ok(frame) = FrameHeader::decode(header) {
            assert_eq!(&frame.encode(), header);
        }
    }
});
