//! What a decrypted packet may be addressed to, as the engine decides it: discovery's rules
//! first for broadcasts, multicasts and subscription messages, the inbound destination filter
//! (rally-agent-core `inbound`) for everything else. Checked: the filter admits exactly the
//! IPv4 packets to our virtual IP and counts every other; nothing reaches the TUN device
//! addressed to another unicast address (a private network behind us, another member).
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use rally_agent_core::discovery::{Discovery, DiscoveryConfig, Inbound};
use rally_agent_core::inbound::InboundFilter;
use rally_proto::Key32;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);

fuzz_target!(|data: &[u8]| {
    let mut filter = InboundFilter::new(VIP);
    let ours = data.len() >= 20 && data[0] >> 4 == 4 && data[16..20] == VIP.octets();
    assert_eq!(filter.admits(data), ours);
    assert_eq!(filter.dropped(), u64::from(!ours));

    // The engine's composition (`Engine::accept_inbound_destination`).
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    let mut disc = Discovery::new(DiscoveryConfig::default(), VIP, 16);
    let mut p = data.to_vec();
    let delivered = if !disc.is_discovery_packet(&p) {
        filter.admits(&p)
    } else {
        match disc.handle_peer_packet(&Key32([1; 32]), &["lan".into()], &mut p, now) {
            Inbound::Deliver => true,
            Inbound::NotDiscovery => filter.admits(&p),
            Inbound::Subscribed(_) | Inbound::Dropped(_) => false,
        }
    };
    if delivered {
        assert!(
            p.len() >= 20 && p[0] >> 4 == 4,
            "delivered a packet that is no IPv4"
        );
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        assert!(
            dst == VIP || dst.is_broadcast() || dst.is_multicast(),
            "delivered a packet to {dst}"
        );
    }
});
