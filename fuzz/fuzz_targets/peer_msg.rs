//! Every frame on a link between core servers (after admission): decodes
//! or drops the link, never panics.
#![no_main]

use canopy_broker::core::group::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode(bytes::Bytes::copy_from_slice(data));
});
