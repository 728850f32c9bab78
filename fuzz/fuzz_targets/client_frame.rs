//! Every client-to-server frame content: decodes or is refused, never
//! panics; what decodes encodes and decodes to itself.
#![no_main]

use canopy_client::protocol::{decode_client, encode_client};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode_client(bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = encode_client(&frame);
    let back =
        decode_client(again.slice(4..)).expect("what decoded encodes to something that decodes");
    assert_eq!(back, frame);
});
