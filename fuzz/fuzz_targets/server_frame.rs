//! Every server-to-client frame content, as the SDK and relays read it:
//! decodes (a delivery into its messages) or is refused, never panics.
#![no_main]

use canopy_client::protocol::{decode_server, messages, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ServerFrame::Deliver(head, body)) = decode_server(bytes::Bytes::copy_from_slice(data))
    {
        let mut out = Vec::new();
        let _ = messages(&head, &body, &mut out);
    }
});
