use super::*;

#[test]
fn small_packets_and_handshakes_are_small_full_segments_bulk() {
    assert_eq!(class_of(84 + 32), Class::Small); // a ping through WireGuard
    assert_eq!(class_of(148), Class::Small); // a handshake initiation
    assert_eq!(class_of(SMALL_MAX), Class::Small);
    assert_eq!(class_of(SMALL_MAX + 1), Class::Bulk);
    assert_eq!(class_of(1452), Class::Bulk);
}

#[test]
fn socket_buffer_is_the_bdp_but_never_below_the_minimum() {
    // 1 Gbit/s over 20 ms: 2.5 MB.
    assert_eq!(
        socket_buffer_bytes(1_000_000_000, Duration::from_millis(20), 0),
        2_500_000
    );
    assert_eq!(
        socket_buffer_bytes(10_000_000, Duration::from_millis(1), 4 * 65_536),
        4 * 65_536
    );
}

#[test]
fn codel_never_drops_below_target() {
    let t0 = origin();
    let mut c = Codel::default();
    for i in 0..10_000u32 {
        assert!(!c.should_drop(ms(1), 1_000_000, t0 + ms(u64::from(i))));
    }
}

#[test]
fn codel_drops_after_one_interval_above_target() {
    let t0 = origin();
    let mut c = Codel::default();
    assert!(!c.should_drop(ms(3), 100_000, t0));
    assert!(!c.should_drop(ms(3), 100_000, t0 + ms(99)));
    assert!(c.should_drop(ms(3), 100_000, t0 + ms(100)));
    assert!(c.is_dropping());
}

#[test]
fn codel_drops_ever_faster_while_the_queue_stands() {
    let t0 = origin();
    let mut c = Codel::default();
    c.should_drop(ms(5), 100_000, t0);
    let mut drops = Vec::new();
    // Every 100 µs for one second, sojourn always above target.
    for i in 0..=10_000u64 {
        let t = t0 + Duration::from_micros(100 * i);
        if c.should_drop(ms(5), 100_000, t) {
            drops.push(t.duration_since(t0).as_micros() / 100);
        }
    }
    // 100 ms above target, then one interval, then interval/sqrt(2) = 70.7 ms later.
    assert_eq!(&drops[..3], &[1000, 2000, 2708]);
    let gaps: Vec<_> = drops.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] <= g[0]), "{gaps:?}");
}

#[test]
fn codel_stops_dropping_once_the_sojourn_falls_below_target() {
    let t0 = origin();
    let mut c = Codel::default();
    c.should_drop(ms(5), 100_000, t0);
    assert!(c.should_drop(ms(5), 100_000, t0 + ms(100)));
    assert!(!c.should_drop(ms(1), 100_000, t0 + ms(101)));
    assert!(!c.is_dropping());
    assert!(!c.should_drop(ms(5), 100_000, t0 + ms(300)));
}

#[test]
fn codel_ignores_a_queue_with_less_than_a_packet_behind() {
    let t0 = origin();
    let mut c = Codel::default();
    for i in 0..1000u64 {
        assert!(!c.should_drop(ms(50), 1000, t0 + ms(i)));
    }
}

#[test]
fn ce_mark_sets_both_bits_and_keeps_the_checksum_valid() {
    for ect in [0b01u8, 0b10] {
        let mut p = ipv4_header(ect);
        assert_eq!(mark_ce(&mut p), Marked::Ce);
        assert_eq!(p[1] & 0b11, 0b11);
        assert_eq!(p[1] >> 2, 0x2e, "DSCP untouched");
        assert_eq!(checksum(&p[..20]), 0, "header checksum must verify");
    }
}

#[test]
fn ce_mark_refuses_packets_that_are_not_ecn_capable() {
    let mut p = ipv4_header(0);
    let before = p.clone();
    assert_eq!(mark_ce(&mut p), Marked::NotEct);
    assert_eq!(p, before);
    assert_eq!(mark_ce(&mut [0x60; 40]), Marked::NotEct, "IPv6");
    assert_eq!(mark_ce(&mut [0x45; 10]), Marked::NotEct, "truncated");
    let mut ce = ipv4_header(0b11);
    assert_eq!(mark_ce(&mut ce), Marked::Ce);
    assert_eq!(checksum(&ce[..20]), 0);
}

#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn origin() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An IPv4/UDP header with DSCP 0x2e, the given ECN bits and a valid checksum.
fn ipv4_header(ecn: u8) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 66, 0, 2, 10, 66, 0, 3,
    ];
    p[1] = (0x2e << 2) | ecn;
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&[0; 20]);
    p
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
