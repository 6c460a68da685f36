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
//! [`BIND_REQUEST_PADDING`] zero bytes so that the 36-byte challenge amplifies nothing, and
//! `Ping` carries [`TAG_LEN`] zero bytes so that its `Pong` is no larger.
//!
//! What the relay says to an agent about its session (`BindOk`, `Pong`, and `Error` whenever
//! the relay can) is sealed: a [`TAG_LEN`]-byte HMAC-SHA256 over the message with the session
//! key, [`session_key`], that both sides derive from the bind (the relay's cookie, sent only to
//! the agent's address, and the agent's signature). A datagram spoofed from the relay's address
//! by anyone off the path cannot carry a valid tag. `Bind` is type 10 since the tags came in;
//! the relay refuses the old type 3 with `Error{Outdated}` and counts it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::key::Key32;

pub const MAGIC: [u8; 2] = [0x52, 0x4c];
pub const HEADER_LEN: usize = 4;
/// Header of `Send`/`Deliver`: the 4-byte header and an 8-byte short id.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 8;
/// Zero bytes after a `BindRequest`'s header: it is as long as the challenge it asks for.
pub const BIND_REQUEST_PADDING: usize = 32;
/// Tag of the agent's bind signature.
pub const DOMAIN_BIND: &[u8] = b"rally/relay-bind/v1";
/// Length of the tag that seals the relay's messages to an agent.
pub const TAG_LEN: usize = 16;

/// The tag sealing a relay message (see [`RelayMsg::sealed`]).
pub type Tag = [u8; TAG_LEN];

/// The key that seals a session's messages: derived by the agent when it signs the bind and by
/// the relay when it checks it, from the relay's cookie and the agent's signature.
pub fn session_key(cookie: &[u8; 32], signature: &[u8; 64]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"rally/relay-session/v1\0");
    h.update(cookie);
    h.update(signature);
    h.finalize().into()
}

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
    /// The bind of agents before sealed replies: refused with `Error{Outdated}`.
    pub const BIND_V1: u8 = 3;
    pub const BIND: u8 = 10;
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
    /// The agent speaks an older version of this protocol (an unsealed bind).
    Outdated = 8,
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
            8 => Outdated,
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
            RelayErrorCode::Outdated => "outdated_agent",
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
    /// Sealed with the session key.
    BindOk {
        observed: SocketAddr,
        expires_at: u64,
        tag: Tag,
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
    /// Sealed with the session key.
    Pong {
        nonce: u64,
        tag: Tag,
    },
    /// Sealed when the relay has a key for the agent (a live session, or a bind whose cookie
    /// checked); `NotBound` and `BadCookie` cannot be, and an agent takes them only as a hint.
    Error {
        code: RelayErrorCode,
        tag: Option<Tag>,
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
    #[error("a bind from an agent older than sealed relay replies")]
    OutdatedBind,
}

/// `body` if it is exactly `n` bytes long, else which way it is off.
fn exact(body: &[u8], n: usize) -> Result<&[u8], RelayDecodeError> {
    match body.len() {
        l if l < n => Err(RelayDecodeError::Truncated),
        l if l > n => Err(RelayDecodeError::Trailing),
        _ => Ok(body),
    }
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
        match d[2] {
            t @ (kind::BIND_REQUEST
            | kind::BIND_CHALLENGE
            | kind::BIND
            | kind::BIND_V1
            | kind::BIND_OK) => Self::decode_bind(t, body),
            kind::SEND | kind::DELIVER => {
                if body.len() < 8 {
                    return Err(RelayDecodeError::Truncated);
                }
                let id = arr(&body[..8]);
                let payload = &body[8..];
                Ok(if d[2] == kind::SEND {
                    RelayMsg::Send { to: id, payload }
                } else {
                    RelayMsg::Deliver { from: id, payload }
                })
            }
            t @ (kind::PING | kind::PONG | kind::ERROR) => Self::decode_liveness(t, body),
            t => Err(RelayDecodeError::UnknownType(t)),
        }
    }

    /// The bind handshake's messages (`t` is one of the `BIND*` kinds), from the body after
    /// the header.
    fn decode_bind(t: u8, body: &'a [u8]) -> Result<Self, RelayDecodeError> {
        Ok(match t {
            kind::BIND_REQUEST => {
                if exact(body, BIND_REQUEST_PADDING)?.iter().any(|&b| b != 0) {
                    return Err(RelayDecodeError::BadField);
                }
                RelayMsg::BindRequest
            }
            kind::BIND_CHALLENGE => RelayMsg::BindChallenge {
                cookie: arr(exact(body, 32)?),
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
            kind::BIND_V1 => return Err(RelayDecodeError::OutdatedBind),
            kind::BIND_OK => {
                if body.len() < 8 + TAG_LEN {
                    return Err(RelayDecodeError::Truncated);
                }
                let expires_at = u64::from_be_bytes(arr(&body[..8]));
                let (observed, used) = decode_addr(&body[8..])?;
                if 8 + used + TAG_LEN != body.len() {
                    return Err(RelayDecodeError::Trailing);
                }
                RelayMsg::BindOk {
                    observed,
                    expires_at,
                    tag: arr(&body[8 + used..]),
                }
            }
            t => return Err(RelayDecodeError::UnknownType(t)),
        })
    }

    /// Ping, pong and error (`t` is one of those kinds), from the body after the header.
    fn decode_liveness(t: u8, body: &'a [u8]) -> Result<Self, RelayDecodeError> {
        Ok(match t {
            kind::PING => {
                let b = exact(body, 8 + TAG_LEN)?;
                if b[8..].iter().any(|&x| x != 0) {
                    return Err(RelayDecodeError::BadField);
                }
                RelayMsg::Ping {
                    nonce: u64::from_be_bytes(arr(b)),
                }
            }
            kind::PONG => {
                let b = exact(body, 8 + TAG_LEN)?;
                RelayMsg::Pong {
                    nonce: u64::from_be_bytes(arr(b)),
                    tag: arr(&b[8..]),
                }
            }
            kind::ERROR => {
                let tag = match body.len() {
                    1 => None,
                    n if n == 1 + TAG_LEN => Some(arr(&body[1..])),
                    0 => return Err(RelayDecodeError::Truncated),
                    _ => return Err(RelayDecodeError::Trailing),
                };
                RelayMsg::Error {
                    code: RelayErrorCode::from_u8(body[0]).ok_or(RelayDecodeError::BadField)?,
                    tag,
                }
            }
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
                tag,
            } => {
                out.extend_from_slice(&expires_at.to_be_bytes());
                encode_addr(observed, out);
                out.extend_from_slice(tag);
            }
            RelayMsg::Send { to: id, payload } | RelayMsg::Deliver { from: id, payload } => {
                out.extend_from_slice(id);
                out.extend_from_slice(payload);
            }
            RelayMsg::Ping { nonce } => {
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&[0; TAG_LEN]);
            }
            RelayMsg::Pong { nonce, tag } => {
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(tag);
            }
            RelayMsg::Error { code, tag } => {
                out.push(*code as u8);
                if let Some(tag) = tag {
                    out.extend_from_slice(tag);
                }
            }
        }
    }

    /// The message encoded and sealed with `key`: its tag (for `Error`, a tag even if it had
    /// none) replaced by the HMAC of everything before it. Other messages are only encoded.
    pub fn sealed(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut v = match self {
            RelayMsg::Error { code, .. } => RelayMsg::Error {
                code: *code,
                tag: Some([0; TAG_LEN]),
            }
            .to_vec(),
            m => m.to_vec(),
        };
        let sealable = matches!(
            self,
            RelayMsg::BindOk { .. } | RelayMsg::Pong { .. } | RelayMsg::Error { .. }
        );
        if sealable {
            let n = v.len() - TAG_LEN;
            let t = seal_tag(key, &v[..n]);
            v[n..].copy_from_slice(&t);
        }
        v
    }

    /// Whether this message carries a tag made with `key` (constant time). A message that
    /// cannot be sealed, or an `Error` without a tag, is never authentic.
    pub fn is_sealed_by(&self, key: &[u8; 32]) -> bool {
        let Some(tag) = self.tag() else {
            return false;
        };
        let v = self.to_vec();
        let n = v.len() - TAG_LEN;
        let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
            return false;
        };
        m.update(&v[..n]);
        m.verify_truncated_left(&tag).is_ok()
    }

    fn tag(&self) -> Option<Tag> {
        match self {
            RelayMsg::BindOk { tag, .. } | RelayMsg::Pong { tag, .. } => Some(*tag),
            RelayMsg::Error { tag, .. } => *tag,
            _ => None,
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

fn seal_tag(key: &[u8; 32], data: &[u8]) -> Tag {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    arr(&m.finalize().into_bytes())
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
mod tests;
