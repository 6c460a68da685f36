//! What the relay core is configured with and what it answers: limits, sockets ([`Via`]),
//! actions, drop reasons and counters.

use std::net::SocketAddr;
use std::time::Duration;

use rally_proto::Key32;

/// Tunables of a relay. [`Limits::default`] gives the documented CLI defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most sessions at once (default 10000).
    pub max_sessions: usize,
    /// Most sessions from one source IP; IPv6 sources count per /64 (default 1024: a carrier
    /// NAT puts many users behind one address, and each identity holds one session anyway).
    pub max_sessions_per_ip: usize,
    /// Packets per second one session may send, with a one-second burst (default 20000).
    pub max_pps: u64,
    /// Bits per second one session may send, with a one-second burst (default 100 Mbit/s).
    pub max_bps: u64,
    /// A session that sends nothing (no `Send`, no `Ping`) for this long is removed (default 60 s).
    pub idle_timeout: Duration,
    /// Unauthenticated replies (bind challenges, bind results, STUN responses) per second per
    /// source IP (default 64), with a burst of [`Limits::handshake_burst`].
    pub handshake_rate: u32,
    /// Burst of the handshake budget (default 128).
    pub handshake_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_ip: 1024,
            max_pps: 20_000,
            max_bps: 100_000_000,
            idle_timeout: Duration::from_secs(60),
            handshake_rate: 64,
            handshake_burst: 128,
        }
    }
}

/// Everything a [`Relay`] is built from, besides its seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The control plane's public key: tokens must be signed by it.
    pub control_key: Key32,
    /// The address of the primary socket ([`Via::Primary`]), reported in STUN responses.
    pub local: SocketAddr,
    /// The address of the alternate-port socket ([`Via::Alt`]), if there is one.
    pub alt: Option<SocketAddr>,
    /// Session limits and rates.
    pub limits: Limits,
}

impl Config {
    /// A configuration with default limits and no alternate port.
    pub fn new(control_key: Key32, local: SocketAddr) -> Self {
        Config {
            control_key,
            local,
            alt: None,
            limits: Limits::default(),
        }
    }
}

/// Which of the relay's sockets a datagram came in on or must leave from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// The `--listen` socket.
    Primary,
    /// The `--alt-port` socket (RFC 5780).
    Alt,
    /// A TLS-over-TCP connection (`--listen-tcp`); the address is the connection's remote
    /// address, which identifies it among the TCP sessions.
    Tcp,
}

impl Via {
    /// The transport of this socket or connection.
    pub fn transport(self) -> Transport {
        match self {
            Via::Primary | Via::Alt => Transport::Udp,
            Via::Tcp => Transport::Tcp,
        }
    }
}

/// How an agent reaches the relay. An agent may hold one session per transport at once (a UDP
/// one and a standby over TCP); a `Deliver` goes to the one it was heard from last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP datagrams on the primary or alternate port.
    Udp,
    /// Length-prefixed frames on TLS over TCP.
    Tcp,
}

impl Transport {
    /// Both, UDP first.
    pub const ALL: [Transport; 2] = [Transport::Udp, Transport::Tcp];

    /// The name in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Most TCP sessions one agent holds at once (a further bind evicts the oldest).
pub const MAX_TCP_SESSIONS: usize = 2;
/// Largest `Deliver` (bytes) copied onto both of an agent's TCP sessions; larger ones (bulk)
/// go on one only.
pub use rally_proto::relay_stream::SMALL_FRAME;

/// A datagram the relay wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from.
    pub via: Via,
    /// The destination.
    pub to: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// What to do with one received datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The datagram was a `Send` and has been rewritten in place into a `Deliver`: send its
    /// first `len` bytes (all of it) from `via` to `to`.
    Forward {
        /// The socket the destination session is bound on.
        via: Via,
        /// The destination session's address.
        to: SocketAddr,
        /// Bytes to send from the start of the datagram buffer.
        len: usize,
        /// The destination's other TCP session, when it holds two and the datagram is small
        /// WireGuard data ([`rally_proto::relay_stream::is_copied`]): the same bytes go there too (over [`Via::Tcp`]), so one lost
        /// segment on one connection does not hold the frame back.
        also: Option<SocketAddr>,
    },
    /// Send this answer.
    Reply(Transmit),
    /// Nothing is forwarded; the drop has been counted under `reason`. `reply`, if any, is an
    /// error message for the sender.
    Drop {
        /// Why.
        reason: DropReason,
        /// An error to send back (already rate-limited).
        reply: Option<Transmit>,
    },
}

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Why a datagram was not forwarded or answered as asked.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $($(#[$doc])* $variant,)*
        }

        impl DropReason {
            /// Every reason, in declaration order (so `reason as usize` indexes it).
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// The snake_case name used in logs and metrics labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// Neither a relay message nor STUN, or a malformed one.
    Garbage => "garbage",
    /// A well-formed message a relay never accepts (a `Deliver`, a STUN response, ...).
    Unexpected => "unexpected",
    /// `Send` or `Ping` from a source with no live session.
    NotBound => "not_bound",
    /// `Bind` with a cookie not made for this source recently.
    BadCookie => "bad_cookie",
    /// `Bind` with a token that is malformed or not signed by the control plane.
    BadToken => "bad_token",
    /// `Bind` with a token that names no party (the session could reach no one).
    NoParty => "no_party",
    /// `Bind` of the old type, from an agent older than sealed relay replies.
    OutdatedAgent => "outdated_agent",
    /// `Bind` with an expired token.
    TokenExpired => "token_expired",
    /// `Bind` whose signature is not by the key the token names.
    BadSignature => "bad_signature",
    /// `Bind` refused: the relay holds its maximum number of sessions.
    LimitSessions => "limit_sessions",
    /// `Bind` refused: the source IP holds its maximum number of sessions.
    LimitPerIp => "limit_per_ip",
    /// `Bind` refused: another live agent has the same short id.
    ShortIdTaken => "short_id_taken",
    /// A session's packet or byte budget is spent.
    RateLimited => "rate_limited",
    /// The source IP's budget for unauthenticated replies is spent.
    HandshakeRateLimited => "handshake_rate_limited",
    /// `Send` to a session that shares no party with the sender.
    NoSharedParty => "no_shared_party",
    /// `Send` to a short id with no live session.
    PeerUnavailable => "peer_unavailable",
    /// A STUN request asking for a change of address this relay cannot make.
    StunChangeUnsupported => "stun_change_unsupported",
    /// A STUN request with RESPONSE-PORT shorter than the answer would be (no amplification).
    StunUnpadded => "stun_unpadded",
}

/// Counters since the relay started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions alive now.
    pub sessions_active: u64,
    /// Of those, sessions over TCP.
    pub sessions_active_tcp: u64,
    /// Sessions ever bound (a rebind counts again).
    pub sessions_total: u64,
    /// Binds refused, for any reason.
    pub sessions_refused: u64,
    /// `Send`s forwarded as `Deliver`s.
    pub packets_forwarded: u64,
    /// Bytes of the forwarded datagrams.
    pub bytes_forwarded: u64,
    /// Of the forwarded packets, those to or from a session over TCP.
    pub packets_forwarded_tcp: u64,
    /// STUN binding requests answered.
    pub stun_requests: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Datagrams dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Every reason with its count (zeros included), in [`DropReason::ALL`] order.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.drops(r)))
    }

    /// All drops, whatever the reason.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub(super) fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}
