//! Every frame on a link between core servers (after admission): decodes
//! or drops the link, never panics; what decodes encodes back to a frame
//! that decodes to the same message.
#![no_main]

use canopy_broker::core::group::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = wire::decode(bytes::Bytes::copy_from_slice(data)) {
        let frame = wire::encode(&msg);
        assert_eq!(wire::decode(frame.slice(4..)), Ok(msg));
    }
});
