//! Discovery's parsers of packets from the TUN device, the capture socket and peers:
//! classification, IGMP reports, subscription messages, source/destination rewrites, and the
//! inbound rules as a whole.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use rally_agent_core::discovery::{packet, Discovery, DiscoveryConfig, Origin};
use rally_proto::Key32;

fuzz_target!(|data: &[u8]| {
    let directed = Ipv4Addr::new(10, 66, 255, 255);
    let _ = packet::classify(data, directed);
    let _ = packet::igmp_changes(data);
    let _ = packet::parse_subscription(data);
    let _ = packet::udp_payload(data);
    let mut p = data.to_vec();
    if packet::rewrite_source(&mut p, Ipv4Addr::new(10, 66, 0, 2)) {
        assert!(packet::checksums_ok(&p));
    }
    let _ = packet::rewrite_destination(&mut p, Ipv4Addr::BROADCAST);
    // A fixed instant: the rules take time as a parameter.
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    let mut d = Discovery::new(DiscoveryConfig::default(), Ipv4Addr::new(10, 66, 0, 2), 16);
    let mut q = data.to_vec();
    let _ = d.handle_peer_packet(&Key32([1; 32]), &["lan".into()], &mut q, now);
    let mut r = data.to_vec();
    let _ = d.handle_local(&mut r, Origin::Capture, now);
});
