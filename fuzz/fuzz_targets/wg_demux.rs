//! The data plane's demultiplexer (rally-agent-core `demux`) on arbitrary datagrams: each gets
//! one kind that agrees with its first bytes and length, a receiver index is read only from the
//! kinds that carry one, and every WireGuard handshake kind is what the handshake guard checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_agent_core::demux::{classify, receiver_index, Datagram, WgKind};
use rally_agent_core::handshake_guard::is_handshake;

const STUN_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

fuzz_target!(|d: &[u8]| {
    let kind = classify(d);
    match kind {
        Datagram::Stun => assert!(d.len() >= 20 && d[0] & 0xc0 == 0 && d[4..8] == STUN_COOKIE),
        Datagram::Relay => assert!(rally_proto::relay::is_relay(d)),
        Datagram::Probe => assert!(rally_proto::probe::is_probe(d)),
        Datagram::WireGuard(k) => {
            assert_eq!(d[1..4], [0, 0, 0]);
            let (ty, ok_len) = match k {
                WgKind::Initiation => (1, d.len() == 148),
                WgKind::Response => (2, d.len() == 92),
                WgKind::CookieReply => (3, d.len() == 64),
                WgKind::Data => (4, d.len() >= 32),
            };
            assert_eq!(d[0], ty);
            assert!(ok_len, "{k:?} of {} bytes", d.len());
        }
        Datagram::Unknown => {}
    }
    let carries_index = matches!(
        kind,
        Datagram::WireGuard(WgKind::Response | WgKind::CookieReply | WgKind::Data)
    );
    assert_eq!(receiver_index(d).is_some(), carries_index);
    if matches!(
        kind,
        Datagram::WireGuard(WgKind::Initiation | WgKind::Response)
    ) {
        assert!(is_handshake(d), "a handshake the guard would not check");
    }
});
