//! Unit tests of the WAN emulator's pure parts (the lab tests exercise the rest).

use std::time::Instant;

use super::control::{is_far, loss_threshold};
use super::queue::Queue;
use super::thread::{Lane, SplitMix64};
use super::*;

#[test]
fn default_profile_is_twenty_ms_without_loss() {
    let p = WanProfile::default();
    assert_eq!(p.delay, Duration::from_millis(20));
    assert_eq!(p.loss, 0.0);
}

#[test]
fn profiles_out_of_range_are_refused() {
    assert!(WanProfile::delay(Duration::from_secs(11))
        .validate()
        .is_err());
    assert!(WanProfile::default().with_loss(1.5).validate().is_err());
    assert!(WanProfile::default().with_loss(-0.1).validate().is_err());
    assert!(WanProfile::default()
        .with_loss(f64::NAN)
        .validate()
        .is_err());
    assert!(WanProfile::default().with_loss(1.0).validate().is_ok());
}

#[test]
fn loss_threshold_covers_none_to_all() {
    assert_eq!(loss_threshold(0.0), 0);
    assert_eq!(loss_threshold(1.0), 1 << 32);
    assert!(u64::from(u32::MAX) < loss_threshold(1.0));
    assert_eq!(loss_threshold(0.5), 1 << 31);
}

#[test]
fn profile_round_trips_through_control() {
    let c = Control::new(WanProfile::delay(Duration::from_millis(300)).with_loss(0.05))
        .expect("eventfd");
    assert_eq!(
        c.profile(),
        WanProfile::delay(Duration::from_millis(300)).with_loss(0.05)
    );
}

#[test]
fn seeded_draws_lose_about_the_configured_fraction() {
    let mut rng = SplitMix64(7);
    let threshold = loss_threshold(0.05);
    let lost = (0..100_000)
        .filter(|_| u64::from(rng.next_u32()) < threshold)
        .count();
    assert!((4_500..5_500).contains(&lost), "{lost}");
}

/// An Ethernet frame carrying IPv4 from `src` to `dst` (header fields beyond the
/// addresses left zero).
fn ipv4_frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    f
}

#[test]
fn far_frames_are_ipv4_to_or_from_a_far_address() {
    let mut far = [0u32; MAX_FAR];
    far[1] = u32::from(Ipv4Addr::new(198, 51, 100, 101));
    let b = [198, 51, 100, 101];
    let other = [198, 51, 100, 11];
    assert!(is_far(&ipv4_frame(other, b), &far), "to it");
    assert!(is_far(&ipv4_frame(b, other), &far), "from it");
    assert!(!is_far(&ipv4_frame(other, [198, 51, 100, 12]), &far));
    let mut arp = ipv4_frame(b, b);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert!(!is_far(&arp, &far), "not IPv4");
    assert!(!is_far(&ipv4_frame(b, b)[..30], &far), "runt");
    assert!(
        !is_far(&ipv4_frame([0; 4], [0; 4]), &[0; MAX_FAR]),
        "none set"
    );
}

#[test]
fn far_settings_are_checked_and_round_trip() {
    let ip = Ipv4Addr::new(203, 0, 113, 7);
    assert!(validate_far(&[ip; MAX_FAR + 1], Duration::ZERO).is_err());
    assert!(validate_far(&[Ipv4Addr::UNSPECIFIED], Duration::ZERO).is_err());
    assert!(validate_far(&[ip], Duration::from_secs(11)).is_err());
    assert!(validate_far(&[ip], Duration::from_millis(50)).is_ok());
    let c = Control::new(WanProfile::default()).expect("eventfd");
    c.set_far(&[ip], Duration::from_millis(50));
    let (far, extra) = c.far();
    assert_eq!(
        (far[0], far[1], extra),
        (u32::from(ip), 0, Duration::from_millis(50))
    );
    c.set_far(&[], Duration::ZERO);
    assert_eq!(c.far().0, [0; MAX_FAR]);
}

#[test]
fn a_far_frame_held_longer_does_not_hold_back_a_later_near_one() {
    let t0 = Instant::now();
    let mut lane = Lane {
        near: Queue::new(4),
        far: Queue::new(4),
    };
    let frame = ipv4_frame([1, 2, 3, 4], [5, 6, 7, 8]);
    // The far frame arrives first, due in 70 ms; a near frame then, due in 20 ms.
    assert!(lane.far.push(&frame, t0 + Duration::from_millis(70)));
    assert!(lane.near.push(&frame, t0 + Duration::from_millis(20)));
    assert_eq!(lane.next_due(), Some(t0 + Duration::from_millis(20)));
    assert_eq!(lane.far.next_due(), Some(t0 + Duration::from_millis(70)));
    for _ in 0..3 {
        assert!(lane.far.push(&frame, t0));
    }
    assert!(!lane.far.push(&frame, t0), "a full ring refuses");
    assert_eq!(lane.far.len[lane.far.head], frame.len() as u16);
}

#[test]
fn device_names_must_fit_ifnamsiz() {
    assert!(ifname_array("u12a").is_ok());
    assert!(ifname_array("a-very-long-device-name").is_err());
}
