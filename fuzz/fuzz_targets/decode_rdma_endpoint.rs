//! Fuzzes the RDMA endpoint decoder (rails and QPs a peer offers in its handshake).
#![no_main]

use kvtransfer::wire::RdmaEndpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(endpoint) = RdmaEndpoint::decode(data) {
        // Whatever decodes re-decodes to the same value (PSNs are masked to 24 bits on decode).
        assert_eq!(RdmaEndpoint::decode(&endpoint.encode()).unwrap(), endpoint);
    }
});
