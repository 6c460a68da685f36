//! What a decrypted unicast packet may be addressed to: this agent's virtual IP. Broadcast and
//! multicast are discovery's to judge first (`Engine::accept_inbound_destination` makes the
//! two one check: what discovery does not claim comes here). A member with a modified
//! client could otherwise send packets through its tunnel to any address the victim's host
//! routes — a private network behind it, or its other interfaces.

use std::net::Ipv4Addr;

/// The destination filter for packets coming out of the tunnels.
#[derive(Debug)]
pub struct InboundFilter {
    virtual_ip: Ipv4Addr,
    dropped: u64,
}

impl InboundFilter {
    pub fn new(virtual_ip: Ipv4Addr) -> Self {
        InboundFilter {
            virtual_ip,
            dropped: 0,
        }
    }

    /// Whether a decrypted IPv4 packet may go to the TUN device; counts the ones that may not.
    pub fn admits(&mut self, packet: &[u8]) -> bool {
        let ok = destination(packet) == Some(self.virtual_ip);
        if !ok {
            self.dropped += 1;
        }
        ok
    }

    /// Packets dropped for their destination.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 66, 0, 9]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn only_packets_to_our_virtual_ip_pass() {
        let mut f = InboundFilter::new(Ipv4Addr::new(10, 66, 0, 2));
        assert!(f.admits(&ipv4([10, 66, 0, 2])));
        assert!(
            !f.admits(&ipv4([192, 168, 7, 1])),
            "a private network behind us"
        );
        assert!(!f.admits(&ipv4([10, 66, 0, 3])), "another member's address");
        assert!(!f.admits(&ipv4([10, 66, 255, 255])));
        assert!(!f.admits(&[0x60; 40]), "not IPv4");
        assert!(!f.admits(&[0x45; 10]), "truncated");
        assert_eq!(f.dropped(), 5);
    }
}
