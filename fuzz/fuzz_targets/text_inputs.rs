//! The text a server reads: topics and patterns, the config file and the
//! accounts file. Refused with a reason or taken, never a panic.
#![no_main]

use canopy_broker::auth::Accounts;
use canopy_broker::config::FileConfig;
use canopy_client::permissions::covers;
use canopy_client::topic::{Pattern, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Topic::validate(text);
    if let Some((a, b)) = text.split_once('\n') {
        if let (Ok(p), Ok(q)) = (Pattern::new(a), Pattern::new(b)) {
            // A pattern that covers another selects every topic it does.
            if covers(&p, &q) {
                let topic = b.replace(['*', '>'], "t");
                assert!(p.matches(&topic), "{a} covers {b} but not {topic}");
            }
        }
    }
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        // Validating `[auth]` and `[tls]` reads the files they name (the
        // operator's, not input): parsed above, not opened here.
        if file.auth.is_none() && file.tls.is_none() {
            let _ = file.validate(1);
        }
    }
    let _ = Accounts::parse(text);
});
