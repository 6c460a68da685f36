//! `Key32::from_str` on arbitrary text; every accepted key must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::Key32;

fuzz_target!(|text: &str| {
    if let Ok(key) = text.parse::<Key32>() {
        let enc = key.to_string();
        assert_eq!(enc.parse::<Key32>(), Ok(key), "key changed on a round trip");
        // The text form is canonical: an accepted key is exactly what `Display` writes.
        assert_eq!(enc, text.trim(), "accepted a non-canonical key");
    }
});
