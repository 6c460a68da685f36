//! IPv4 packets as discovery sees them: what a packet from the TUN device or the capture socket
//! is (broadcast, multicast, IGMP, or none of those), rewriting a captured packet's source to
//! the sender's virtual IP with correct checksums, and the small peer-to-peer message that
//! carries a member's multicast subscriptions inside the tunnel.
//!
//! Every function takes untrusted bytes and bounds-checks them; none panics.

use std::net::Ipv4Addr;

/// The IP protocol number of the subscription message between agents (RFC 3692's
/// experimental 253). It travels only inside WireGuard, from a peer's virtual IP to ours, and
/// never reaches the kernel: the engine consumes it.
pub const SUBSCRIPTION_PROTO: u8 = 253;
/// Groups one subscription message may carry; more are cut (and counted by the sender).
pub const MAX_GROUPS: usize = 64;
const MAGIC: &[u8; 4] = b"RLYD";
const VERSION: u8 = 1;
const UDP: u8 = 17;
const IGMP: u8 = 2;

/// Link-local multicast (224.0.0.0/24) games use, forwarded although the block is not routed.
/// None is known to be needed yet: mDNS (224.0.0.251) and the routing protocols stay local.
pub const LINK_LOCAL_ALLOWED: &[Ipv4Addr] = &[];

/// What a packet is, for discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UDP to the limited broadcast or the overlay's directed broadcast.
    Broadcast { dst: Ipv4Addr, port: u16 },
    /// UDP to a routable multicast group (224.0.0.0/4 outside 224.0.0.0/24).
    Multicast { group: Ipv4Addr, port: u16 },
    /// An IGMP message (a membership report when the kernel sends it).
    Igmp,
    /// Anything else: unicast, fragments, link-local multicast, other protocols.
    Other,
}

/// The fields of an IPv4 packet discovery needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub header_len: usize,
    pub total_len: usize,
    /// Fragment offset or more-fragments set.
    pub fragment: bool,
}

/// Parses an IPv4 header; `None` for anything that is not a whole, well-formed one.
pub fn parse_ipv4(p: &[u8]) -> Option<Ipv4> {
    let first = *p.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    if header_len < 20 || total_len < header_len || total_len > p.len() {
        return None;
    }
    let frag = u16::from_be_bytes([p[6], p[7]]);
    Some(Ipv4 {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        proto: p[9],
        header_len,
        total_len,
        fragment: frag & 0x3fff != 0,
    })
}

/// Whether `a` is a multicast group discovery forwards.
pub fn is_forwarded_group(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_multicast() && (o[..3] != [224, 0, 0] || LINK_LOCAL_ALLOWED.contains(&a))
}

/// Classifies a packet; `directed` is the overlay's directed broadcast (10.66.255.255).
pub fn classify(p: &[u8], directed: Ipv4Addr) -> Kind {
    let Some(ip) = parse_ipv4(p) else {
        return Kind::Other;
    };
    if ip.proto == IGMP {
        return Kind::Igmp;
    }
    if ip.proto != UDP || ip.fragment || ip.total_len < ip.header_len + 8 {
        return Kind::Other;
    }
    let h = ip.header_len;
    let port = u16::from_be_bytes([p[h + 2], p[h + 3]]);
    if ip.dst == Ipv4Addr::BROADCAST || ip.dst == directed {
        Kind::Broadcast { dst: ip.dst, port }
    } else if is_forwarded_group(ip.dst) {
        Kind::Multicast {
            group: ip.dst,
            port,
        }
    } else {
        Kind::Other
    }
}

/// The UDP payload of a packet `classify` called broadcast or multicast.
pub fn udp_payload(p: &[u8]) -> &[u8] {
    match parse_ipv4(p) {
        Some(ip) if ip.total_len >= ip.header_len + 8 => &p[ip.header_len + 8..ip.total_len],
        _ => &[],
    }
}

/// An IGMP membership change found in a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Join(Ipv4Addr),
    Leave(Ipv4Addr),
}

/// The membership changes an IGMP v2 report/leave or v3 report announces (at most
/// [`MAX_GROUPS`]); empty for queries and malformed messages.
pub fn igmp_changes(p: &[u8]) -> Vec<Membership> {
    let Some(ip) = parse_ipv4(p).filter(|ip| ip.proto == IGMP) else {
        return Vec::new();
    };
    let m = &p[ip.header_len..ip.total_len];
    let group = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    match (m.first(), m.len()) {
        (Some(0x16), 8..) => vec![Membership::Join(group(&m[4..8]))],
        (Some(0x17), 8..) => vec![Membership::Leave(group(&m[4..8]))],
        (Some(0x22), 8..) => igmp3_records(m),
        _ => Vec::new(),
    }
}

fn igmp3_records(m: &[u8]) -> Vec<Membership> {
    let count = usize::from(u16::from_be_bytes([m[6], m[7]]));
    let mut out = Vec::new();
    let mut at = 8;
    for _ in 0..count.min(MAX_GROUPS) {
        let Some(rec) = m.get(at..at + 8) else {
            break;
        };
        let sources = usize::from(u16::from_be_bytes([rec[2], rec[3]]));
        let g = Ipv4Addr::new(rec[4], rec[5], rec[6], rec[7]);
        // MODE_IS_EXCLUDE / CHANGE_TO_EXCLUDE with no sources: "everything" = joined;
        // INCLUDE with no sources = left.
        match (rec[0], sources) {
            (2 | 4, _) => out.push(Membership::Join(g)),
            (1 | 3, 0) => out.push(Membership::Leave(g)),
            (1 | 3 | 5, _) => out.push(Membership::Join(g)),
            _ => {}
        }
        at += 8 + sources * 4 + usize::from(rec[1]) * 4;
    }
    out
}

/// Rewrites the source address of an IPv4/UDP packet and recomputes both checksums (a packet
/// captured on its way out may carry only a partial UDP checksum, left to the NIC).
pub fn rewrite_source(p: &mut [u8], src: Ipv4Addr) -> bool {
    let Some(ip) = parse_ipv4(p).filter(|ip| ip.proto == UDP && !ip.fragment) else {
        return false;
    };
    if ip.total_len < ip.header_len + 8 {
        return false;
    }
    p[12..16].copy_from_slice(&src.octets());
    fix_checksums(&mut p[..ip.total_len], ip.header_len);
    true
}

/// Rewrites the destination address of an IPv4/UDP packet and recomputes both checksums.
pub fn rewrite_destination(p: &mut [u8], dst: Ipv4Addr) -> bool {
    let Some(ip) = parse_ipv4(p).filter(|ip| ip.proto == UDP && !ip.fragment) else {
        return false;
    };
    if ip.total_len < ip.header_len + 8 {
        return false;
    }
    p[16..20].copy_from_slice(&dst.octets());
    fix_checksums(&mut p[..ip.total_len], ip.header_len);
    true
}

/// Recomputes the IPv4 header checksum and the UDP checksum of a whole packet.
fn fix_checksums(p: &mut [u8], h: usize) {
    p[10] = 0;
    p[11] = 0;
    let c = !fold(sum(&p[..h]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = p.len() - h;
    p[h + 6] = 0;
    p[h + 7] = 0;
    let mut s = sum(&p[12..20]) + u32::from(UDP) + udp_len as u32;
    s += sum(&p[h..]);
    let c = match !fold(s) {
        0 => 0xffff,
        c => c,
    };
    p[h + 6..h + 8].copy_from_slice(&c.to_be_bytes());
}

fn sum(b: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Whether the IPv4 header and UDP checksums of a packet are right (for tests and checks).
pub fn checksums_ok(p: &[u8]) -> bool {
    let Some(ip) = parse_ipv4(p) else {
        return false;
    };
    let h = ip.header_len;
    if fold(sum(&p[..h])) != 0xffff {
        return false;
    }
    if ip.proto != UDP || ip.total_len < h + 8 {
        return true;
    }
    let udp = &p[h..ip.total_len];
    if udp[6..8] == [0, 0] {
        return true;
    }
    let s = sum(&p[12..20]) + u32::from(UDP) + udp.len() as u32 + sum(udp);
    fold(s) == 0xffff
}

/// Builds the subscription message from `src` (our virtual IP) to `dst` (a peer's): an IPv4
/// packet of protocol [`SUBSCRIPTION_PROTO`] whose payload is `RLYD`, a version byte, a count
/// byte and the groups. It always carries the whole set, so a lost one is mended by the next.
pub fn subscription_packet(src: Ipv4Addr, dst: Ipv4Addr, groups: &[Ipv4Addr]) -> Vec<u8> {
    let groups = &groups[..groups.len().min(MAX_GROUPS)];
    let total = 20 + 6 + groups.len() * 4;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 1;
    p[9] = SUBSCRIPTION_PROTO;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = !fold(sum(&p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..24].copy_from_slice(MAGIC);
    p[24] = VERSION;
    p[25] = groups.len() as u8;
    for (i, g) in groups.iter().enumerate() {
        p[26 + i * 4..30 + i * 4].copy_from_slice(&g.octets());
    }
    p
}

/// Why a subscription message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not a subscription message")]
    NotOurs,
    #[error("malformed subscription message")]
    Malformed,
}

/// Parses a subscription message: its source and the groups it lists (only forwarded groups
/// are kept). `Err(NotOurs)` for any packet of another protocol.
pub fn parse_subscription(p: &[u8]) -> Result<(Ipv4Addr, Vec<Ipv4Addr>), MessageError> {
    let ip = parse_ipv4(p).ok_or(MessageError::NotOurs)?;
    if ip.proto != SUBSCRIPTION_PROTO {
        return Err(MessageError::NotOurs);
    }
    let m = &p[ip.header_len..ip.total_len];
    if m.len() < 6 || &m[..4] != MAGIC || m[4] != VERSION {
        return Err(MessageError::Malformed);
    }
    let n = usize::from(m[5]);
    if n > MAX_GROUPS || m.len() != 6 + n * 4 {
        return Err(MessageError::Malformed);
    }
    let groups = m[6..]
        .chunks_exact(4)
        .map(|g| Ipv4Addr::new(g[0], g[1], g[2], g[3]))
        .filter(|g| is_forwarded_group(*g))
        .collect();
    Ok((ip.src, groups))
}

/// A UDP/IPv4 packet, for tests and the lab's attack clients.
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = UDP;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    fix_checksums(&mut p, 20);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIRECTED: Ipv4Addr = Ipv4Addr::new(10, 66, 255, 255);
    const A: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);

    #[test]
    fn broadcasts_multicasts_and_the_rest() {
        let b = udp_packet(A, Ipv4Addr::BROADCAST, 5000, 19132, b"ping");
        assert_eq!(
            classify(&b, DIRECTED),
            Kind::Broadcast {
                dst: Ipv4Addr::BROADCAST,
                port: 19132
            }
        );
        let d = udp_packet(A, DIRECTED, 5000, 7, b"x");
        assert!(matches!(classify(&d, DIRECTED), Kind::Broadcast { .. }));
        let g = Ipv4Addr::new(224, 0, 2, 60);
        let m = udp_packet(A, g, 5000, 4445, b"[MOTD]x[/MOTD]");
        assert_eq!(
            classify(&m, DIRECTED),
            Kind::Multicast {
                group: g,
                port: 4445
            }
        );
        let mdns = udp_packet(A, Ipv4Addr::new(224, 0, 0, 251), 5353, 5353, b"");
        assert_eq!(classify(&mdns, DIRECTED), Kind::Other);
        let uni = udp_packet(A, Ipv4Addr::new(10, 66, 0, 3), 1, 2, b"");
        assert_eq!(classify(&uni, DIRECTED), Kind::Other);
        assert_eq!(udp_payload(&m), b"[MOTD]x[/MOTD]");
    }

    #[test]
    fn fragments_are_not_forwarded() {
        let mut b = udp_packet(A, Ipv4Addr::BROADCAST, 1, 2, b"abc");
        b[6] = 0x20; // more fragments
        assert_eq!(classify(&b, DIRECTED), Kind::Other);
    }

    #[test]
    fn rewritten_source_has_right_checksums() {
        let mut p = udp_packet(
            Ipv4Addr::new(192, 168, 1, 10),
            Ipv4Addr::BROADCAST,
            4000,
            19132,
            b"odd-length payload",
        );
        // A captured packet may carry only a partial checksum.
        p[26] = 0x12;
        p[27] = 0x34;
        assert!(!checksums_ok(&p));
        assert!(rewrite_source(&mut p, A));
        assert!(checksums_ok(&p));
        assert_eq!(parse_ipv4(&p).map(|ip| ip.src), Some(A));
    }

    #[test]
    fn igmp_v2_and_v3_reports() {
        let mut v2 = vec![0u8; 28];
        v2[0] = 0x45;
        v2[2..4].copy_from_slice(&28u16.to_be_bytes());
        v2[9] = 2;
        v2[20] = 0x16;
        v2[24..28].copy_from_slice(&[224, 0, 2, 60]);
        assert_eq!(classify(&v2, DIRECTED), Kind::Igmp);
        assert_eq!(
            igmp_changes(&v2),
            vec![Membership::Join(Ipv4Addr::new(224, 0, 2, 60))]
        );
        let mut v3 = vec![0u8; 20 + 8 + 16];
        v3[0] = 0x45;
        v3[2..4].copy_from_slice(&44u16.to_be_bytes());
        v3[9] = 2;
        v3[20] = 0x22;
        v3[27] = 2;
        v3[28] = 4; // CHANGE_TO_EXCLUDE {} = join
        v3[32..36].copy_from_slice(&[224, 0, 2, 60]);
        v3[36] = 3; // CHANGE_TO_INCLUDE {} = leave
        v3[40..44].copy_from_slice(&[239, 1, 2, 3]);
        assert_eq!(
            igmp_changes(&v3),
            vec![
                Membership::Join(Ipv4Addr::new(224, 0, 2, 60)),
                Membership::Leave(Ipv4Addr::new(239, 1, 2, 3))
            ]
        );
    }

    #[test]
    fn subscription_message_round_trip() {
        let groups = [Ipv4Addr::new(224, 0, 2, 60), Ipv4Addr::new(239, 255, 0, 1)];
        let p = subscription_packet(A, Ipv4Addr::new(10, 66, 0, 3), &groups);
        assert_eq!(parse_subscription(&p), Ok((A, groups.to_vec())));
        let mut bad = p.clone();
        bad[25] = 3;
        assert_eq!(parse_subscription(&bad), Err(MessageError::Malformed));
        let udp = udp_packet(A, A, 1, 2, b"");
        assert_eq!(parse_subscription(&udp), Err(MessageError::NotOurs));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = classify(&p, DIRECTED);
            let _ = igmp_changes(&p);
            let _ = parse_subscription(&p);
            let _ = udp_payload(&p);
            let mut q = p.clone();
            let _ = rewrite_source(&mut q, A);
        }

        #[test]
        fn arbitrary_ip_header_igmp_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 10, 66, 0, 2, 224, 0, 0, 22];
            p.extend_from_slice(&tail);
            let len = p.len() as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            let _ = igmp_changes(&p);
        }
    }
}
