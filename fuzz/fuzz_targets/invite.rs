//! `InviteCode::decode` on arbitrary text; every accepted code must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::InviteCode;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(code) = InviteCode::decode(&text) {
        let enc = code.encode();
        assert_eq!(
            InviteCode::decode(&enc),
            Ok(code),
            "invite code changed on a round trip"
        );
        // The text form is canonical: an accepted code is exactly what `encode` writes.
        assert_eq!(enc, text.trim(), "accepted a non-canonical invite code");
    }
});
