//! Real WireGuard handshake messages (boringtun's initiator) for the guard's and the cookies'
//! tests: what the guard must let through is what a real peer sends.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// An initiator with the static key `[seed; 32]`, talking to `to`.
pub fn initiator(seed: u8, to: PublicKey) -> Tunn {
    Tunn::new(
        StaticSecret::from([seed; 32]),
        to,
        None,
        None,
        u32::from(seed),
        None,
    )
}

/// A fresh handshake initiation from `t` (valid mac1; mac2 once `t` took a cookie).
pub fn initiation(t: &mut Tunn) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match t.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        _ => panic!("no initiation"),
    }
}

/// Hands `t` a datagram (a cookie reply), ignoring what it answers.
pub fn receive(t: &mut Tunn, datagram: &[u8]) {
    let mut buf = [0u8; 256];
    let _ = t.decapsulate(None, datagram, &mut buf);
}

/// The initiator's static key, if `datagram` is an initiation to `secret` that decrypts (the
/// Diffie-Hellman the guard stands in front of).
pub fn initiator_key(
    secret: &StaticSecret,
    public: &PublicKey,
    datagram: &[u8],
) -> Option<[u8; 32]> {
    let Ok(boringtun::noise::Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram)
    else {
        return None;
    };
    boringtun::noise::handshake::parse_handshake_anon(secret, public, &init)
        .ok()
        .map(|h| h.peer_static_public)
}
