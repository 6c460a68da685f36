//! Our wrapper around boringtun's `Tunn`: it keeps boringtun's buffer rules and its error type
//! (which has no `Display`) at this edge, and creates the `Tunn` only when the peer is first
//! talked to. A `Tunn` is about 11 KiB; in a party most pairs of members never exchange a
//! packet, so an idle peer costs the few bytes needed to create one later.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Overhead WireGuard adds to a packet; `dst` buffers must be at least this much larger than
/// the packet, and never smaller than a handshake initiation.
pub const OVERHEAD: usize = 32;
pub const MIN_BUF: usize = 148;

/// What one step of the tunnel asks the caller to do.
#[derive(Debug)]
pub enum Output<'a> {
    /// Send these bytes to the peer.
    Network(&'a [u8]),
    /// Deliver this IPv4 packet, whose inner source address is given, to the TUN device.
    Tunnel(&'a [u8], Ipv4Addr),
    /// Nothing (more) to do.
    Done,
}

/// Why the tunnel refused a packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TunnelError {
    #[error("wireguard: {0}")]
    WireGuard(String),
    #[error("IPv6 inside the overlay is not supported")]
    Ipv6,
    /// A data message whose counter was seen already (or is behind the replay window): the
    /// copy of a datagram sent on two relay connections. boringtun refuses it before any
    /// decryption and changes no state.
    #[error("duplicate")]
    Duplicate,
}

impl From<WireGuardError> for TunnelError {
    fn from(e: WireGuardError) -> Self {
        match e {
            WireGuardError::DuplicateCounter => TunnelError::Duplicate,
            e => TunnelError::WireGuard(format!("{e:?}")),
        }
    }
}

/// A WireGuard session with one peer; boringtun's state is boxed and created on first use
/// (a packet to send, a datagram received, or an explicit handshake).
pub struct Tunnel {
    tunn: Option<Box<Tunn>>,
    secret: StaticSecret,
    peer: PublicKey,
    keepalive: Option<u16>,
    index: u32,
}

/// Counters boringtun keeps for a tunnel.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelStats {
    pub since_handshake: Option<Duration>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub rtt_ms: Option<u32>,
}

impl Tunnel {
    /// `index` must be unique among this agent's peers and fit in 24 bits.
    pub fn new(secret: StaticSecret, peer: PublicKey, keepalive: Option<u16>, index: u32) -> Self {
        Tunnel {
            tunn: None,
            secret,
            peer,
            keepalive,
            index: index & 0x00ff_ffff,
        }
    }

    /// Whether boringtun's state exists yet (the peer has been talked to).
    #[cfg(test)]
    fn is_active(&self) -> bool {
        self.tunn.is_some()
    }

    fn tunn(&mut self) -> &mut Tunn {
        self.tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                self.secret.clone(),
                self.peer,
                None,
                self.keepalive,
                self.index,
                None,
            ))
        })
    }

    /// Encrypts a packet from the TUN device (or starts a handshake and queues it).
    pub fn encapsulate<'a>(
        &mut self,
        packet: &[u8],
        dst: &'a mut [u8],
    ) -> Result<Output<'a>, TunnelError> {
        debug_assert!(dst.len() >= (packet.len() + OVERHEAD).max(MIN_BUF));
        convert(self.tunn().encapsulate(packet, dst))
    }

    /// Processes a datagram from the network. When the result is `Network`, call again with an
    /// empty datagram until `Done` to flush queued packets.
    pub fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> Result<Output<'a>, TunnelError> {
        convert(self.tunn().decapsulate(from, datagram, dst))
    }

    /// Runs WireGuard's timers: handshake retries, keepalives, session expiry. A tunnel never
    /// used has none to run.
    pub fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> Result<Output<'a>, TunnelError> {
        match &mut self.tunn {
            Some(t) => convert(t.update_timers(dst)),
            None => Ok(Output::Done),
        }
    }

    /// Starts a handshake now (unless one is already under way and `force` is false).
    pub fn handshake<'a>(
        &mut self,
        dst: &'a mut [u8],
        force: bool,
    ) -> Result<Output<'a>, TunnelError> {
        convert(self.tunn().format_handshake_initiation(dst, force))
    }

    pub fn stats(&self) -> TunnelStats {
        let Some(tunn) = &self.tunn else {
            return TunnelStats::default();
        };
        let (since_handshake, tx_bytes, rx_bytes, _loss, rtt_ms) = tunn.stats();
        TunnelStats {
            since_handshake,
            tx_bytes,
            rx_bytes,
            rtt_ms,
        }
    }
}

fn convert(r: TunnResult<'_>) -> Result<Output<'_>, TunnelError> {
    match r {
        TunnResult::Done => Ok(Output::Done),
        TunnResult::Err(e) => Err(e.into()),
        TunnResult::WriteToNetwork(b) => Ok(Output::Network(b)),
        TunnResult::WriteToTunnelV4(b, src) => Ok(Output::Tunnel(b, src)),
        TunnResult::WriteToTunnelV6(..) => Err(TunnelError::Ipv6),
    }
}

/// Identifies the peer behind a handshake initiation by decrypting its static key.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Tunnel, Tunnel, StaticSecret, StaticSecret) {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let ta = Tunnel::new(a.clone(), PublicKey::from(&b), None, 1);
        let tb = Tunnel::new(b.clone(), PublicKey::from(&a), None, 2);
        (ta, tb, a, b)
    }

    /// A minimal IPv4 header (20 bytes) with the given source and destination.
    fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&20u16.to_be_bytes());
        p[8] = 64;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn handshake_then_packet_reaches_the_other_side() {
        let (mut a, mut b, a_secret, b_secret) = pair();
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];
        let packet = ipv4([10, 66, 0, 2], [10, 66, 0, 3]);

        // a has no session: the packet is queued and a handshake initiation comes out.
        let Ok(Output::Network(init)) = a.encapsulate(&packet, &mut buf) else {
            panic!()
        };
        let init = init.to_vec();
        let who = initiator_key(&b_secret, &PublicKey::from(&b_secret), &init).unwrap();
        assert_eq!(who, PublicKey::from(&a_secret).to_bytes());

        let Ok(Output::Network(resp)) = b.decapsulate(None, &init, &mut buf) else {
            panic!()
        };
        let resp = resp.to_vec();
        // a takes the response; the queued packet (then a keepalive) comes out encrypted.
        let Ok(Output::Network(first)) = a.decapsulate(None, &resp, &mut buf) else {
            panic!()
        };
        let first = first.to_vec();
        let mut delivered = None;
        for datagram in [first] {
            if let Ok(Output::Tunnel(p, src)) = b.decapsulate(None, &datagram, &mut buf2) {
                delivered = Some((p.to_vec(), src));
            }
        }
        while let Ok(Output::Network(more)) = a.decapsulate(None, &[], &mut buf) {
            let more = more.to_vec();
            if let Ok(Output::Tunnel(p, src)) = b.decapsulate(None, &more, &mut buf2) {
                delivered = Some((p.to_vec(), src));
            }
        }
        let (p, src) = delivered.expect("the queued packet is delivered");
        assert_eq!(p, packet);
        assert_eq!(src, Ipv4Addr::new(10, 66, 0, 2));
    }

    /// The copy of a data message that came on two relay connections: refused as a duplicate
    /// (no error string, no state change), and the next message still gets through.
    #[test]
    fn a_duplicate_data_message_is_refused_as_such_and_changes_nothing() {
        let (mut a, mut b, ..) = pair();
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];
        let packet = ipv4([10, 66, 0, 2], [10, 66, 0, 3]);
        let Ok(Output::Network(init)) = a.encapsulate(&packet, &mut buf) else {
            panic!("no initiation")
        };
        let init = init.to_vec();
        let Ok(Output::Network(resp)) = b.decapsulate(None, &init, &mut buf2) else {
            panic!("no response")
        };
        let resp = resp.to_vec();
        let mut to_b = Vec::new();
        if let Ok(Output::Network(d)) = a.decapsulate(None, &resp, &mut buf) {
            to_b.push(d.to_vec());
        }
        while let Ok(Output::Network(d)) = a.decapsulate(None, &[], &mut buf) {
            to_b.push(d.to_vec());
        }
        for d in &to_b {
            let _ = b.decapsulate(None, d, &mut buf2);
        }
        let Ok(Output::Network(data)) = a.encapsulate(&packet, &mut buf) else {
            panic!("no data message")
        };
        let data = data.to_vec();
        assert!(matches!(
            b.decapsulate(None, &data, &mut buf2),
            Ok(Output::Tunnel(..))
        ));
        assert_eq!(
            b.decapsulate(None, &data, &mut buf2).err(),
            Some(TunnelError::Duplicate)
        );
        let Ok(Output::Network(next)) = a.encapsulate(&packet, &mut buf) else {
            panic!("no data message")
        };
        let next = next.to_vec();
        assert!(matches!(
            b.decapsulate(None, &next, &mut buf2),
            Ok(Output::Tunnel(..))
        ));
    }

    #[test]
    fn initiation_from_a_stranger_names_the_stranger() {
        let (_, _, _, b_secret) = pair();
        let stranger = StaticSecret::from([9u8; 32]);
        let mut t = Tunnel::new(stranger.clone(), PublicKey::from(&b_secret), None, 3);
        let mut buf = vec![0u8; 256];
        let Ok(Output::Network(init)) = t.handshake(&mut buf, true) else {
            panic!()
        };
        let who = initiator_key(&b_secret, &PublicKey::from(&b_secret), init).unwrap();
        assert_eq!(who, PublicKey::from(&stranger).to_bytes());
    }

    #[test]
    fn boringtun_state_exists_only_once_the_peer_is_talked_to() {
        let (mut a, mut b, ..) = pair();
        assert!(
            std::mem::size_of::<Tunnel>() < 256,
            "an idle peer's tunnel stays small"
        );
        let mut buf = vec![0u8; 2048];
        // Timers and counters of a tunnel never used: nothing to do, nothing created.
        assert!(matches!(a.update_timers(&mut buf), Ok(Output::Done)));
        assert_eq!(a.stats().tx_bytes, 0);
        assert!(!a.is_active() && !b.is_active());
        // A packet to send creates it (and starts a handshake); so does a datagram received.
        let Ok(Output::Network(init)) =
            a.encapsulate(&ipv4([10, 66, 0, 2], [10, 66, 0, 3]), &mut buf)
        else {
            panic!()
        };
        let init = init.to_vec();
        assert!(a.is_active());
        assert!(matches!(
            b.decapsulate(None, &init, &mut buf),
            Ok(Output::Network(_))
        ));
        assert!(b.is_active());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (mut a, ..) = pair();
        let mut buf = vec![0u8; 256];
        assert!(a
            .decapsulate(None, &[4, 0, 0, 0, 1, 2, 3], &mut buf)
            .is_err());
        assert!(initiator_key(
            &StaticSecret::from([1u8; 32]),
            &PublicKey::from([0u8; 32]),
            &[1; 148]
        )
        .is_none());
    }
}
