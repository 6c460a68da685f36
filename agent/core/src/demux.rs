//! Telling apart what arrives on the agent's one UDP socket, by its first bytes.
//!
//! A STUN message starts with two zero bits and carries the magic cookie 0x2112A442 at bytes
//! 4..8; a STUN binding response begins 0x01 0x01, like a WireGuard initiation (type 1), so the
//! cookie is what decides. WireGuard messages start with a type byte 1..=4 followed by three
//! zero bytes and have fixed lengths (data: at least 32 bytes; boringtun does not pad data
//! messages to 16 bytes as the spec asks, so no multiple is required).

/// What a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    Stun,
    /// To or from a relay (`0x52 0x4C …`).
    Relay,
    /// A path probe between agents (`0x52 0x50 …`).
    Probe,
    WireGuard(WgKind),
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgKind {
    Initiation,
    Response,
    CookieReply,
    Data,
}

const STUN_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Classifies a datagram without parsing it further.
pub fn classify(d: &[u8]) -> Datagram {
    if d.len() >= 20 && d[0] & 0xc0 == 0 && d[4..8] == STUN_COOKIE && d.len().is_multiple_of(4) {
        return Datagram::Stun;
    }
    if rally_proto::relay::is_relay(d) {
        return Datagram::Relay;
    }
    if rally_proto::probe::is_probe(d) {
        return Datagram::Probe;
    }
    if d.len() < 4 || d[1..4] != [0, 0, 0] {
        return Datagram::Unknown;
    }
    let kind = match (d[0], d.len()) {
        (1, 148) => WgKind::Initiation,
        (2, 92) => WgKind::Response,
        (3, 64) => WgKind::CookieReply,
        (4, n) if n >= 32 => WgKind::Data,
        _ => return Datagram::Unknown,
    };
    Datagram::WireGuard(kind)
}

/// The receiver index of a WireGuard response, cookie reply or data message.
pub fn receiver_index(d: &[u8]) -> Option<u32> {
    match classify(d) {
        Datagram::WireGuard(WgKind::Response) => d.get(8..12),
        Datagram::WireGuard(WgKind::CookieReply | WgKind::Data) => d.get(4..8),
        _ => None,
    }
    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wg(kind: u8, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        d[0] = kind;
        d
    }

    #[test]
    fn stun_binding_response_is_not_a_wireguard_initiation() {
        let mut d = vec![0u8; 148];
        d[0] = 0x01;
        d[1] = 0x01;
        d[4..8].copy_from_slice(&STUN_COOKIE);
        assert_eq!(classify(&d), Datagram::Stun);
    }

    #[test]
    fn wireguard_initiation_without_cookie_is_wireguard() {
        let mut d = wg(1, 148);
        d[4..8].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(classify(&d), Datagram::WireGuard(WgKind::Initiation));
    }

    #[test]
    fn wireguard_kinds_by_type_and_length() {
        assert_eq!(classify(&wg(2, 92)), Datagram::WireGuard(WgKind::Response));
        assert_eq!(
            classify(&wg(3, 64)),
            Datagram::WireGuard(WgKind::CookieReply)
        );
        assert_eq!(classify(&wg(4, 32)), Datagram::WireGuard(WgKind::Data));
        assert_eq!(
            classify(&wg(4, 32 + 1408)),
            Datagram::WireGuard(WgKind::Data)
        );
    }

    #[test]
    fn wrong_lengths_and_types_are_unknown() {
        assert_eq!(classify(&wg(1, 147)), Datagram::Unknown);
        assert_eq!(classify(&wg(4, 31)), Datagram::Unknown);
        // Unpadded data, as boringtun sends it.
        assert_eq!(classify(&wg(4, 33)), Datagram::WireGuard(WgKind::Data));
        assert_eq!(classify(&wg(5, 92)), Datagram::Unknown);
        assert_eq!(classify(&[]), Datagram::Unknown);
        let mut d = wg(4, 48);
        d[2] = 1;
        assert_eq!(classify(&d), Datagram::Unknown);
    }

    #[test]
    fn relay_messages_and_probes_have_their_own_kinds() {
        let relay = rally_proto::relay::RelayMsg::Ping { nonce: 1 }.to_vec();
        assert_eq!(classify(&relay), Datagram::Relay);
        let probe = rally_proto::probe::Probe {
            kind: rally_proto::probe::ProbeKind::Probe,
            from: [1; 8],
            txid: 2,
        }
        .encode(&[0; 32]);
        assert_eq!(classify(&probe), Datagram::Probe);
    }

    #[test]
    fn receiver_index_is_read_little_endian() {
        let mut d = wg(4, 48);
        d[4..8].copy_from_slice(&0x0102_0304u32.to_le_bytes());
        assert_eq!(receiver_index(&d), Some(0x0102_0304));
        let mut r = wg(2, 92);
        r[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(receiver_index(&r), Some(7));
        assert_eq!(receiver_index(&wg(1, 148)), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&d);
            let _ = receiver_index(&d);
        }
    }
}
