#![allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rally_proto::Key32;

use super::packet::{checksums_ok, parse_ipv4, subscription_packet, udp_packet};
use super::*;

const ME: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
const BOB: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 3);
const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 2, 60);

fn disc(cfg: DiscoveryConfig) -> Discovery {
    Discovery::new(cfg, ME, 16)
}

fn parties() -> Vec<String> {
    vec!["lan".into()]
}

#[test]
fn a_captured_broadcast_goes_to_every_peer_from_our_virtual_ip() {
    let mut d = disc(DiscoveryConfig::default());
    assert_eq!(d.directed_broadcast(), Ipv4Addr::new(10, 66, 255, 255));
    let t = Instant::now();
    let mut p = udp_packet(
        Ipv4Addr::new(192, 168, 1, 10),
        Ipv4Addr::BROADCAST,
        40000,
        19132,
        b"ping",
    );
    assert_eq!(
        d.handle_local(&mut p, Origin::Capture, t),
        Outbound::Forward(Targets::AllPeers)
    );
    assert_eq!(parse_ipv4(&p).map(|ip| ip.src), Some(ME));
    assert!(checksums_ok(&p));
    // Unicast is not discovery's.
    let mut u = udp_packet(ME, BOB, 1, 2, b"");
    assert_eq!(
        d.handle_local(&mut u, Origin::Tun, t),
        Outbound::NotDiscovery
    );
}

#[test]
fn multicast_goes_only_to_subscribers() {
    let mut d = disc(DiscoveryConfig::default());
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let carol = Key32([4; 32]);
    let msg = subscription_packet(BOB, ME, &[GROUP]);
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut msg.clone(), t),
        Inbound::Subscribed(vec![GROUP])
    );
    let mut m = udp_packet(ME, GROUP, 1, 4445, b"[MOTD]w[/MOTD][AD]25565[/AD]");
    assert_eq!(
        d.handle_local(&mut m, Origin::Tun, t),
        Outbound::Forward(Targets::Subscribers(GROUP))
    );
    let subs: Vec<_> = d.subscribers(GROUP).copied().collect();
    assert_eq!(subs, vec![bob]);
    assert!(!subs.contains(&carol));
    // An empty set unsubscribes.
    let msg = subscription_packet(BOB, ME, &[]);
    d.handle_peer_packet(&bob, &parties(), &mut msg.clone(), t);
    assert_eq!(d.subscribers(GROUP).count(), 0);
}

#[test]
fn inbound_multicast_needs_a_local_listener() {
    let mut d = disc(DiscoveryConfig::default());
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let m = udp_packet(BOB, GROUP, 1, 4445, b"a");
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut m.clone(), t),
        Inbound::Dropped(Drop::Unsubscribed)
    );
    assert!(d.set_local_groups(BTreeSet::from([GROUP, Ipv4Addr::new(224, 0, 0, 251)])));
    // Link-local groups are not taken.
    assert_eq!(d.local_groups().len(), 1);
    assert!(!d.set_local_groups(BTreeSet::from([GROUP])));
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut m.clone(), t),
        Inbound::Deliver
    );
    assert_eq!(d.counters().delivered, 1);
    assert_eq!(d.counters().dropped_unsubscribed, 1);
}

#[test]
fn duplicates_are_delivered_once_and_repeats_later_pass() {
    let mut d = disc(DiscoveryConfig::default());
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let b = udp_packet(BOB, Ipv4Addr::BROADCAST, 1, 7777, b"hello");
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut b.clone(), t),
        Inbound::Deliver
    );
    assert_eq!(
        d.handle_peer_packet(
            &bob,
            &parties(),
            &mut b.clone(),
            t + Duration::from_millis(10)
        ),
        Inbound::Dropped(Drop::Duplicate)
    );
    // The same announcement a second later (as games repeat them) passes.
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut b.clone(), t + Duration::from_secs(1)),
        Inbound::Deliver
    );
}

#[test]
fn a_flood_is_capped_both_ways_and_counted() {
    let cfg = DiscoveryConfig {
        rate: 20,
        ..DiscoveryConfig::default()
    };
    let mut d = disc(cfg);
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let mut delivered = 0;
    let mut sent = 0;
    for i in 0..20_000u32 {
        let now = t + Duration::from_micros(u64::from(i) * 100);
        let b = udp_packet(BOB, Ipv4Addr::BROADCAST, 1, 7777, &i.to_be_bytes());
        if d.handle_peer_packet(&bob, &parties(), &mut b.clone(), now) == Inbound::Deliver {
            delivered += 1;
        }
        let mut o = udp_packet(ME, Ipv4Addr::BROADCAST, 1, 7777, &i.to_be_bytes());
        if d.handle_local(&mut o, Origin::Tun, now) == Outbound::Forward(Targets::AllPeers) {
            sent += 1;
        }
    }
    // Two seconds at 20/s plus the one-second burst.
    assert!((59..=61).contains(&delivered), "{delivered}");
    assert!((59..=61).contains(&sent), "{sent}");
    assert_eq!(d.counters().dropped_capped, 2 * 20_000 - delivered - sent);
    // One event per capped sender for the whole flood, not one per packet.
    let events: Vec<_> = std::iter::from_fn(|| d.poll_event()).collect();
    assert_eq!(
        events,
        vec![
            DiscoveryEvent::Capped {
                source: BOB,
                port: 7777
            },
            DiscoveryEvent::Capped {
                source: ME,
                port: 7777
            }
        ]
    );
}

#[test]
fn turned_off_globally_per_port_and_per_party() {
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let b = udp_packet(BOB, Ipv4Addr::BROADCAST, 1, 7777, b"x");

    let mut off = disc(DiscoveryConfig {
        enabled: false,
        ..DiscoveryConfig::default()
    });
    let mut o = udp_packet(ME, Ipv4Addr::BROADCAST, 1, 7777, b"x");
    assert_eq!(
        off.handle_local(&mut o, Origin::Tun, t),
        Outbound::Dropped(Drop::Disabled)
    );
    assert_eq!(
        off.handle_peer_packet(&bob, &parties(), &mut b.clone(), t),
        Inbound::Dropped(Drop::Disabled)
    );

    let mut port = disc(DiscoveryConfig {
        blocked_ports: BTreeSet::from([7777]),
        ..DiscoveryConfig::default()
    });
    assert_eq!(
        port.handle_peer_packet(&bob, &parties(), &mut b.clone(), t),
        Inbound::Dropped(Drop::Disabled)
    );

    let party = disc(DiscoveryConfig {
        blocked_parties: BTreeSet::from(["work".to_string()]),
        ..DiscoveryConfig::default()
    });
    assert!(!party.peer_allowed(&["work".into()]));
    assert!(party.peer_allowed(&["work".into(), "lan".into()]));
}

#[test]
fn status_names_flows_and_last_sender() {
    let mut d = disc(DiscoveryConfig::default());
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let b = udp_packet(BOB, Ipv4Addr::BROADCAST, 1, 7777, b"x");
    d.handle_peer_packet(&bob, &parties(), &mut b.clone(), t);
    let s = d.status(t + Duration::from_millis(1500), |_| "bob".into());
    assert_eq!(s.flows.len(), 1);
    assert_eq!(s.flows[0].port, 7777);
    assert_eq!(s.flows[0].received, 1);
    assert_eq!(s.flows[0].rate_pps, 1);
    assert_eq!(s.flows[0].last_sender, Some(BOB));
    assert_eq!(s.flows[0].last_seen_ms_ago, 1500);
}

#[test]
fn a_directed_broadcast_is_delivered_as_limited_and_never_sent_back() {
    let mut d = disc(DiscoveryConfig::default());
    let t = Instant::now();
    let bob = Key32([3; 32]);
    let mut b = udp_packet(BOB, d.directed_broadcast(), 1, 7777, b"x");
    assert_eq!(
        d.handle_peer_packet(&bob, &parties(), &mut b, t),
        Inbound::Deliver
    );
    assert_eq!(parse_ipv4(&b).map(|ip| ip.dst), Some(Ipv4Addr::BROADCAST));
    assert!(checksums_ok(&b));
    // Were the kernel to route it back into the TUN device, its source is a peer's: dropped.
    assert_eq!(
        d.handle_local(&mut b, Origin::Tun, t),
        Outbound::Dropped(Drop::Foreign)
    );
    assert_eq!(d.counters().dropped_foreign, 1);
}
