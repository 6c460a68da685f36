//! The part of STUN (RFC 8489, with RFC 5780's attributes) that Rally speaks: binding requests
//! and their success responses. Relays answer them; agents send them for NAT detection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_a442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PADDING: u16 = 0x0026;
const ATTR_RESPONSE_PORT: u16 = 0x0027;
const ATTR_RESPONSE_ORIGIN: u16 = 0x802b;
const ATTR_OTHER_ADDRESS: u16 = 0x802c;
/// Largest STUN message accepted.
pub const MAX_LEN: usize = 1280;

pub type TxId = [u8; 12];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingRequest {
    pub txid: TxId,
    /// RFC 5780 CHANGE-REQUEST: answer from the other IP / the other port.
    pub change_ip: bool,
    pub change_port: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    pub txid: TxId,
    /// Where the request came from, as the server saw it.
    pub mapped: SocketAddr,
    /// The server's alternate address (RFC 5780 OTHER-ADDRESS), if it has one.
    pub other: Option<SocketAddr>,
    /// The address the response was sent from (RFC 5780 RESPONSE-ORIGIN).
    pub origin: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("STUN message truncated")]
    Truncated,
    #[error("STUN message longer than {MAX_LEN} bytes")]
    Oversized,
    #[error("STUN message of type {0:#06x} where another was expected")]
    WrongType(u16),
    #[error("STUN attribute {0:#06x} is malformed")]
    BadAttribute(u16),
    #[error("STUN response carries no mapped address")]
    NoAddress,
}

impl BindingRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = header(BINDING_REQUEST, &self.txid);
        if self.change_ip || self.change_port {
            let flags = (u32::from(self.change_ip) << 2) | (u32::from(self.change_port) << 1);
            attr(&mut m, ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
        }
        finish(m)
    }

    pub fn decode(b: &[u8]) -> Result<Self, StunError> {
        let (ty, txid, attrs) = split(b)?;
        if ty != BINDING_REQUEST {
            return Err(StunError::WrongType(ty));
        }
        let mut req = BindingRequest {
            txid,
            change_ip: false,
            change_port: false,
        };
        for a in Attrs(attrs) {
            let (t, v) = a?;
            if t == ATTR_CHANGE_REQUEST {
                let flags: [u8; 4] = v.try_into().map_err(|_| StunError::BadAttribute(t))?;
                let flags = u32::from_be_bytes(flags);
                req.change_ip = flags & 4 != 0;
                req.change_port = flags & 2 != 0;
            }
        }
        Ok(req)
    }
}

impl BindingResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = header(BINDING_SUCCESS, &self.txid);
        attr(
            &mut m,
            ATTR_XOR_MAPPED_ADDRESS,
            &address(&self.mapped, Some(&self.txid)),
        );
        attr(&mut m, ATTR_MAPPED_ADDRESS, &address(&self.mapped, None));
        if let Some(o) = &self.origin {
            attr(&mut m, ATTR_RESPONSE_ORIGIN, &address(o, None));
        }
        if let Some(o) = &self.other {
            attr(&mut m, ATTR_OTHER_ADDRESS, &address(o, None));
        }
        finish(m)
    }

    pub fn decode(b: &[u8]) -> Result<Self, StunError> {
        let (ty, txid, attrs) = split(b)?;
        if ty != BINDING_SUCCESS {
            return Err(StunError::WrongType(ty));
        }
        let (mut xor, mut plain, mut other, mut origin) = (None, None, None, None);
        for a in Attrs(attrs) {
            let (t, v) = a?;
            match t {
                ATTR_XOR_MAPPED_ADDRESS => xor = Some(parse_address(t, v, Some(&txid))?),
                ATTR_MAPPED_ADDRESS => plain = Some(parse_address(t, v, None)?),
                ATTR_OTHER_ADDRESS => other = Some(parse_address(t, v, None)?),
                ATTR_RESPONSE_ORIGIN => origin = Some(parse_address(t, v, None)?),
                _ => {}
            }
        }
        Ok(BindingResponse {
            txid,
            mapped: xor.or(plain).ok_or(StunError::NoAddress)?,
            other,
            origin,
        })
    }
}

/// A binding request carrying RFC 5780 RESPONSE-PORT: "answer to my address, at this port".
/// Padded (RFC 5780 PADDING) to [`RESPONSE_PORT_MIN_LEN`], so a server that only answers
/// requests at least that long never sends more than it received.
pub fn encode_to_port(req: &BindingRequest, port: u16) -> Vec<u8> {
    let mut m = req.encode();
    let mut v = port.to_be_bytes().to_vec();
    v.extend_from_slice(&[0, 0]);
    attr(&mut m, ATTR_RESPONSE_PORT, &v);
    let pad = RESPONSE_PORT_MIN_LEN.saturating_sub(m.len() + 4);
    attr(&mut m, ATTR_PADDING, &vec![0u8; pad]);
    finish(m)
}

/// The least length of a request whose RESPONSE-PORT a server honours: the largest response
/// (IPv6 mapped, origin and other addresses) is no longer.
pub const RESPONSE_PORT_MIN_LEN: usize = 20 + 4 * 24;

/// The RFC 5780 RESPONSE-PORT of a binding request, if it carries one.
pub fn response_port(b: &[u8]) -> Result<Option<u16>, StunError> {
    let (ty, _, attrs) = split(b)?;
    if ty != BINDING_REQUEST {
        return Err(StunError::WrongType(ty));
    }
    for a in Attrs(attrs) {
        let (t, v) = a?;
        if t == ATTR_RESPONSE_PORT {
            let v: [u8; 4] = v.try_into().map_err(|_| StunError::BadAttribute(t))?;
            return Ok(Some(u16::from_be_bytes([v[0], v[1]])));
        }
    }
    Ok(None)
}

/// Whether `b` looks like a STUN message (two zero bits, the magic cookie, a whole length).
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= 20
        && b[0] & 0xc0 == 0
        && b[4..8] == MAGIC_COOKIE.to_be_bytes()
        && b.len().is_multiple_of(4)
}

fn header(ty: u16, txid: &TxId) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(txid);
    m
}

fn attr(m: &mut Vec<u8>, ty: u16, v: &[u8]) {
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&(v.len() as u16).to_be_bytes());
    m.extend_from_slice(v);
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
}

fn finish(mut m: Vec<u8>) -> Vec<u8> {
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    m
}

fn split(b: &[u8]) -> Result<(u16, TxId, &[u8]), StunError> {
    if b.len() > MAX_LEN {
        return Err(StunError::Oversized);
    }
    if b.len() < 20 {
        return Err(StunError::Truncated);
    }
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    if b.len() != 20 + len {
        return Err(StunError::Truncated);
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&b[8..20]);
    Ok((u16::from_be_bytes([b[0], b[1]]), txid, &b[20..]))
}

struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        if self.0.len() < 4 {
            self.0 = &[];
            return Some(Err(StunError::Truncated));
        }
        let t = u16::from_be_bytes([self.0[0], self.0[1]]);
        let len = u16::from_be_bytes([self.0[2], self.0[3]]) as usize;
        let padded = len.div_ceil(4) * 4;
        if self.0.len() < 4 + padded {
            self.0 = &[];
            return Some(Err(StunError::BadAttribute(t)));
        }
        let v = &self.0[4..4 + len];
        self.0 = &self.0[4 + padded..];
        Some(Ok((t, v)))
    }
}

fn address(a: &SocketAddr, xor_txid: Option<&TxId>) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut v = vec![0u8];
    let mut port = a.port();
    if xor_txid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match a.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&port.to_be_bytes());
            let mut o = ip.octets();
            if xor_txid.is_some() {
                o.iter_mut().zip(cookie).for_each(|(b, c)| *b ^= c);
            }
            v.extend_from_slice(&o);
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&port.to_be_bytes());
            let mut o = ip.octets();
            if let Some(txid) = xor_txid {
                let key: Vec<u8> = cookie.iter().chain(txid.iter()).copied().collect();
                o.iter_mut().zip(key).for_each(|(b, c)| *b ^= c);
            }
            v.extend_from_slice(&o);
        }
    }
    v
}

fn parse_address(t: u16, v: &[u8], xor_txid: Option<&TxId>) -> Result<SocketAddr, StunError> {
    let bad = StunError::BadAttribute(t);
    if v.len() < 4 {
        return Err(bad);
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor_txid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let ip: IpAddr = match (v[1], v.len()) {
        (1, 8) => {
            let mut o: [u8; 4] = [v[4], v[5], v[6], v[7]];
            if xor_txid.is_some() {
                o.iter_mut().zip(cookie).for_each(|(b, c)| *b ^= c);
            }
            Ipv4Addr::from(o).into()
        }
        (2, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&v[4..20]);
            if let Some(txid) = xor_txid {
                let key: Vec<u8> = cookie.iter().chain(txid.iter()).copied().collect();
                o.iter_mut().zip(key).for_each(|(b, c)| *b ^= c);
            }
            Ipv6Addr::from(o).into()
        }
        _ => return Err(bad),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trips_with_change_flags() {
        for (ip, port) in [(false, false), (true, false), (false, true), (true, true)] {
            let r = BindingRequest {
                txid: [7; 12],
                change_ip: ip,
                change_port: port,
            };
            assert_eq!(BindingRequest::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn response_port_round_trips_padded() {
        let r = BindingRequest {
            txid: [9; 12],
            change_ip: false,
            change_port: false,
        };
        let m = encode_to_port(&r, 40123);
        assert_eq!(m.len(), RESPONSE_PORT_MIN_LEN);
        assert_eq!(BindingRequest::decode(&m), Ok(r));
        assert_eq!(response_port(&m), Ok(Some(40123)));
        assert_eq!(response_port(&r.encode()), Ok(None));
        // The largest response fits in what the request carried.
        let v6 = "[2001:db8::9]:7".parse().unwrap();
        let resp = BindingResponse {
            txid: [9; 12],
            mapped: v6,
            other: Some(v6),
            origin: Some(v6),
        };
        assert!(resp.encode().len() <= RESPONSE_PORT_MIN_LEN);
    }

    #[test]
    fn response_round_trips_v4_and_v6() {
        for mapped in ["203.0.113.9:40123", "[2001:db8::9]:7"] {
            let r = BindingResponse {
                txid: [3; 12],
                mapped: mapped.parse().unwrap(),
                other: Some("198.51.100.1:3479".parse().unwrap()),
                origin: Some("198.51.100.1:3478".parse().unwrap()),
            };
            assert_eq!(BindingResponse::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn xor_mapped_address_matches_rfc5769_vector() {
        // RFC 5769 2.2: 192.0.2.1:32853 with this transaction id.
        let txid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let v = address(&"192.0.2.1:32853".parse().unwrap(), Some(&txid));
        assert_eq!(v, [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let r = BindingRequest {
            txid: [1; 12],
            change_ip: true,
            change_port: false,
        }
        .encode();
        assert_eq!(BindingRequest::decode(&r[..19]), Err(StunError::Truncated));
        assert_eq!(
            BindingRequest::decode(&r[..r.len() - 4]),
            Err(StunError::Truncated)
        );
        let mut no_cookie = r.clone();
        no_cookie[4] = 0;
        assert_eq!(BindingRequest::decode(&no_cookie), Err(StunError::NotStun));
        assert_eq!(
            BindingRequest::decode(&vec![0; 2000]),
            Err(StunError::Oversized)
        );
        assert!(matches!(
            BindingResponse::decode(&r),
            Err(StunError::WrongType(1))
        ));
        // An attribute claiming more bytes than the message holds.
        let mut bad = r;
        bad[22] = 0x40;
        assert!(matches!(
            BindingRequest::decode(&bad),
            Err(StunError::BadAttribute(_))
        ));
    }

    #[test]
    fn response_without_address_is_refused() {
        let m = finish(header(BINDING_SUCCESS, &[0; 12]));
        assert_eq!(BindingResponse::decode(&m), Err(StunError::NoAddress));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = BindingRequest::decode(&b);
            let _ = BindingResponse::decode(&b);
            let _ = response_port(&b);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut m = header(BINDING_SUCCESS, &[5; 12]);
            m.extend_from_slice(&body);
            while !m.len().is_multiple_of(4) { m.push(0); }
            let m = finish(m);
            let _ = BindingResponse::decode(&m);
        }
    }
}
