//! Messages between agents and relays, on the agent's one UDP socket.
//!
//! Every message starts with the 4-byte header `0x52 0x4C type 0x00` ("RL"): never a WireGuard
//! message (type byte 1..=4 first) nor STUN (first two bits zero). Binding is a stateless
//! challenge: the relay answers `BindRequest` with a cookie bound to the source address, and the
//! agent returns it with its control-plane token and a signature over both by the key the token
//! names. Data is `Send{to}` one way and `Deliver{from}` the other, the same length, so the relay
//! forwards by rewriting 12 header bytes in place.
//!
//! No unauthenticated request is smaller than its answer: `BindRequest` carries
//! [`BIND_REQUEST_PADDING`] zero bytes so that the 36-byte challenge amplifies nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::key::Key32;

pub const MAGIC: [u8; 2] = [0x52, 0x4c];
pub const HEADER_LEN: usize = 4;
/// Header of `Send`/`Deliver`: the 4-byte header and an 8-byte short id.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 8;
/// Zero bytes after a `BindRequest`'s header: it is as long as the challenge it asks for.
pub const BIND_REQUEST_PADDING: usize = 32;
/// Tag of the agent's bind signature.
pub const DOMAIN_BIND: &[u8] = b"rally/relay-bind/v1";

/// The first 8 bytes of an agent's identity key: how agents name each other at a relay.
pub type ShortId = [u8; 8];

pub fn short_id(key: &Key32) -> ShortId {
    let mut s = [0u8; 8];
    s.copy_from_slice(&key.0[..8]);
    s
}

mod kind {
    pub const BIND_REQUEST: u8 = 1;
    pub const BIND_CHALLENGE: u8 = 2;
    pub const BIND: u8 = 3;
    pub const BIND_OK: u8 = 4;
    pub const SEND: u8 = 5;
    pub const DELIVER: u8 = 6;
    pub const PING: u8 = 7;
    pub const PONG: u8 = 8;
    pub const ERROR: u8 = 9;
}

/// Why a relay refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RelayErrorCode {
    NotBound = 1,
    BadToken = 2,
    TokenExpired = 3,
    BadSignature = 4,
    BadCookie = 5,
    LimitReached = 6,
    PeerUnavailable = 7,
}

impl RelayErrorCode {
    fn from_u8(v: u8) -> Option<Self> {
        use RelayErrorCode::*;
        Some(match v {
            1 => NotBound,
            2 => BadToken,
            3 => TokenExpired,
            4 => BadSignature,
            5 => BadCookie,
            6 => LimitReached,
            7 => PeerUnavailable,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RelayErrorCode::NotBound => "not_bound",
            RelayErrorCode::BadToken => "bad_token",
            RelayErrorCode::TokenExpired => "token_expired",
            RelayErrorCode::BadSignature => "bad_signature",
            RelayErrorCode::BadCookie => "bad_cookie",
            RelayErrorCode::LimitReached => "limit_reached",
            RelayErrorCode::PeerUnavailable => "peer_unavailable",
        }
    }
}

/// A decoded relay message, borrowing from the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMsg<'a> {
    BindRequest,
    BindChallenge {
        cookie: [u8; 32],
    },
    Bind {
        cookie: [u8; 32],
        signature: [u8; 64],
        token: &'a [u8],
    },
    BindOk {
        observed: SocketAddr,
        expires_at: u64,
    },
    Send {
        to: ShortId,
        payload: &'a [u8],
    },
    Deliver {
        from: ShortId,
        payload: &'a [u8],
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: RelayErrorCode,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayDecodeError {
    #[error("not a relay message")]
    NotRelay,
    #[error("relay message truncated")]
    Truncated,
    #[error("relay message has trailing bytes")]
    Trailing,
    #[error("unknown relay message type {0}")]
    UnknownType(u8),
    #[error("bad field in relay message")]
    BadField,
}

/// Whether a datagram is a relay message (by its header alone).
pub fn is_relay(d: &[u8]) -> bool {
    d.len() >= HEADER_LEN && d[..2] == MAGIC && d[3] == 0
}

impl<'a> RelayMsg<'a> {
    pub fn decode(d: &'a [u8]) -> Result<Self, RelayDecodeError> {
        if !is_relay(d) {
            return Err(RelayDecodeError::NotRelay);
        }
        let body = &d[HEADER_LEN..];
        let exact = |n: usize| -> Result<&'a [u8], RelayDecodeError> {
            match body.len() {
                l if l < n => Err(RelayDecodeError::Truncated),
                l if l > n => Err(RelayDecodeError::Trailing),
                _ => Ok(body),
            }
        };
        Ok(match d[2] {
            kind::BIND_REQUEST => {
                if exact(BIND_REQUEST_PADDING)?.iter().any(|&b| b != 0) {
                    return Err(RelayDecodeError::BadField);
                }
                RelayMsg::BindRequest
            }
            kind::BIND_CHALLENGE => RelayMsg::BindChallenge {
                cookie: arr(exact(32)?),
            },
            kind::BIND => {
                if body.len() < 96 + 1 {
                    return Err(RelayDecodeError::Truncated);
                }
                RelayMsg::Bind {
                    cookie: arr(&body[..32]),
                    signature: arr(&body[32..96]),
                    token: &body[96..],
                }
            }
            kind::BIND_OK => {
                if body.len() < 8 {
                    return Err(RelayDecodeError::Truncated);
                }
                let expires_at = u64::from_be_bytes(arr(&body[..8]));
                let (observed, used) = decode_addr(&body[8..])?;
                if 8 + used != body.len() {
                    return Err(RelayDecodeError::Trailing);
                }
                RelayMsg::BindOk {
                    observed,
                    expires_at,
                }
            }
            kind::SEND | kind::DELIVER => {
                if body.len() < 8 {
                    return Err(RelayDecodeError::Truncated);
                }
                let id = arr(&body[..8]);
                let payload = &body[8..];
                if d[2] == kind::SEND {
                    RelayMsg::Send { to: id, payload }
                } else {
                    RelayMsg::Deliver { from: id, payload }
                }
            }
            kind::PING => RelayMsg::Ping {
                nonce: u64::from_be_bytes(arr(exact(8)?)),
            },
            kind::PONG => RelayMsg::Pong {
                nonce: u64::from_be_bytes(arr(exact(8)?)),
            },
            kind::ERROR => RelayMsg::Error {
                code: RelayErrorCode::from_u8(exact(1)?[0]).ok_or(RelayDecodeError::BadField)?,
            },
            t => return Err(RelayDecodeError::UnknownType(t)),
        })
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let t = match self {
            RelayMsg::BindRequest => kind::BIND_REQUEST,
            RelayMsg::BindChallenge { .. } => kind::BIND_CHALLENGE,
            RelayMsg::Bind { .. } => kind::BIND,
            RelayMsg::BindOk { .. } => kind::BIND_OK,
            RelayMsg::Send { .. } => kind::SEND,
            RelayMsg::Deliver { .. } => kind::DELIVER,
            RelayMsg::Ping { .. } => kind::PING,
            RelayMsg::Pong { .. } => kind::PONG,
            RelayMsg::Error { .. } => kind::ERROR,
        };
        out.extend_from_slice(&[MAGIC[0], MAGIC[1], t, 0]);
        match self {
            RelayMsg::BindRequest => out.extend_from_slice(&[0; BIND_REQUEST_PADDING]),
            RelayMsg::BindChallenge { cookie } => out.extend_from_slice(cookie),
            RelayMsg::Bind {
                cookie,
                signature,
                token,
            } => {
                out.extend_from_slice(cookie);
                out.extend_from_slice(signature);
                out.extend_from_slice(token);
            }
            RelayMsg::BindOk {
                observed,
                expires_at,
            } => {
                out.extend_from_slice(&expires_at.to_be_bytes());
                encode_addr(observed, out);
            }
            RelayMsg::Send { to: id, payload } | RelayMsg::Deliver { from: id, payload } => {
                out.extend_from_slice(id);
                out.extend_from_slice(payload);
            }
            RelayMsg::Ping { nonce } | RelayMsg::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_be_bytes())
            }
            RelayMsg::Error { code } => out.push(*code as u8),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Writes the `Send` header for `to` into the first [`DATA_HEADER_LEN`] bytes of `buf`
/// (the payload follows it).
pub fn write_send_header(buf: &mut [u8], to: &ShortId) {
    buf[..HEADER_LEN].copy_from_slice(&[MAGIC[0], MAGIC[1], kind::SEND, 0]);
    buf[HEADER_LEN..DATA_HEADER_LEN].copy_from_slice(to);
}

/// Turns a `Send` datagram into the `Deliver` the relay passes on, in place: the destination id
/// is replaced by the sender's. Returns the destination id, or `None` if `d` is not a `Send`.
pub fn send_to_deliver(d: &mut [u8], from: &ShortId) -> Option<ShortId> {
    if d.len() < DATA_HEADER_LEN || !is_relay(d) || d[2] != kind::SEND {
        return None;
    }
    let to = arr(&d[HEADER_LEN..DATA_HEADER_LEN]);
    d[2] = kind::DELIVER;
    d[HEADER_LEN..DATA_HEADER_LEN].copy_from_slice(from);
    Some(to)
}

/// The bytes an agent signs to bind: the relay's cookie and the token.
pub fn bind_transcript(cookie: &[u8; 32], token: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + token.len());
    m.extend_from_slice(cookie);
    m.extend_from_slice(token);
    m
}

fn encode_addr(a: &SocketAddr, out: &mut Vec<u8>) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn decode_addr(b: &[u8]) -> Result<(SocketAddr, usize), RelayDecodeError> {
    let fam = *b.first().ok_or(RelayDecodeError::Truncated)?;
    let (ip, n): (IpAddr, usize) = match fam {
        4 => {
            let o: [u8; 4] = arr(b.get(1..5).ok_or(RelayDecodeError::Truncated)?);
            (Ipv4Addr::from(o).into(), 5)
        }
        6 => {
            let o: [u8; 16] = arr(b.get(1..17).ok_or(RelayDecodeError::Truncated)?);
            (Ipv6Addr::from(o).into(), 17)
        }
        _ => return Err(RelayDecodeError::BadField),
    };
    let p = b.get(n..n + 2).ok_or(RelayDecodeError::Truncated)?;
    Ok((SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])), n + 2))
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Vec<RelayMsg<'static>> {
        vec![
            RelayMsg::BindRequest,
            RelayMsg::BindChallenge { cookie: [1; 32] },
            RelayMsg::Bind {
                cookie: [2; 32],
                signature: [3; 64],
                token: &[4; 50],
            },
            RelayMsg::BindOk {
                observed: "203.0.113.5:40000".parse().unwrap(),
                expires_at: 77,
            },
            RelayMsg::BindOk {
                observed: "[2001:db8::1]:5".parse().unwrap(),
                expires_at: 78,
            },
            RelayMsg::Send {
                to: [5; 8],
                payload: b"wireguard",
            },
            RelayMsg::Deliver {
                from: [6; 8],
                payload: b"",
            },
            RelayMsg::Ping { nonce: 9 },
            RelayMsg::Pong { nonce: 10 },
            RelayMsg::Error {
                code: RelayErrorCode::PeerUnavailable,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let b = m.to_vec();
            assert_eq!(RelayMsg::decode(&b), Ok(m));
        }
    }

    #[test]
    fn truncated_and_trailing_are_refused() {
        for m in all() {
            let b = m.to_vec();
            if !matches!(
                m,
                RelayMsg::Send { .. } | RelayMsg::Deliver { .. } | RelayMsg::Bind { .. }
            ) {
                let mut long = b.clone();
                long.push(0);
                assert!(
                    RelayMsg::decode(&long).is_err(),
                    "{m:?} with a trailing byte"
                );
            }
            if b.len() > HEADER_LEN {
                assert!(
                    RelayMsg::decode(&b[..b.len() - 1]).is_err()
                        || matches!(
                            m,
                            RelayMsg::Send { .. }
                                | RelayMsg::Deliver { .. }
                                | RelayMsg::Bind { .. }
                        ),
                    "{m:?} truncated"
                );
            }
        }
        assert_eq!(
            RelayMsg::decode(&[0x52, 0x4c, 5, 0, 1]),
            Err(RelayDecodeError::Truncated)
        );
    }

    #[test]
    fn unknown_type_and_foreign_datagrams_are_refused() {
        assert_eq!(
            RelayMsg::decode(&[0x52, 0x4c, 99, 0]),
            Err(RelayDecodeError::UnknownType(99))
        );
        assert_eq!(
            RelayMsg::decode(&[1, 0, 0, 0]),
            Err(RelayDecodeError::NotRelay)
        );
        assert_eq!(
            RelayMsg::decode(&[0x52, 0x4c, 9, 0, 200]),
            Err(RelayDecodeError::BadField)
        );
    }

    #[test]
    fn no_unauthenticated_request_is_amplified() {
        let request = RelayMsg::BindRequest.to_vec();
        let challenge = RelayMsg::BindChallenge { cookie: [0; 32] }.to_vec();
        assert!(request.len() >= challenge.len());
        assert_eq!(
            RelayMsg::decode(&[0x52, 0x4c, 1, 0]),
            Err(RelayDecodeError::Truncated)
        );
    }

    #[test]
    fn send_becomes_deliver_in_place() {
        let mut b = RelayMsg::Send {
            to: [5; 8],
            payload: b"data",
        }
        .to_vec();
        assert_eq!(send_to_deliver(&mut b, &[7; 8]), Some([5; 8]));
        assert_eq!(
            RelayMsg::decode(&b),
            Ok(RelayMsg::Deliver {
                from: [7; 8],
                payload: b"data"
            })
        );
        assert_eq!(
            send_to_deliver(&mut b, &[7; 8]),
            None,
            "a Deliver is not forwarded again"
        );
    }

    #[test]
    fn send_header_matches_the_encoder() {
        let mut b = vec![0u8; DATA_HEADER_LEN + 3];
        b[DATA_HEADER_LEN..].copy_from_slice(b"abc");
        write_send_header(&mut b, &[1; 8]);
        assert_eq!(
            b,
            RelayMsg::Send {
                to: [1; 8],
                payload: b"abc"
            }
            .to_vec()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RelayMsg::decode(&b);
            let _ = send_to_deliver(&mut b, &[0; 8]);
        }
    }
}
