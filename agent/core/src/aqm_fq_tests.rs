use super::*;

#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn origin() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn queues(limit: usize) -> FlowQueues<(u64, u32)> {
    FlowQueues::new(limit, QUANTUM, Codel::default())
}

/// Pops everything, returning the flow keys in order.
fn drain(q: &mut FlowQueues<(u64, u32)>, t: Instant) -> Vec<u64> {
    std::iter::from_fn(|| q.pop(t).map(|d| d.item.0)).collect()
}

#[test]
fn one_flow_is_fifo_and_reports_sojourn() {
    let t0 = origin();
    let mut q = queues(100_000);
    q.push(7, (7, 1), 1500, t0);
    q.push(7, (7, 2), 1500, t0 + ms(1));
    assert_eq!((q.len(), q.bytes(), q.active_flows()), (2, 3000, 1));
    let a = q.pop(t0 + ms(5)).expect("first");
    assert_eq!((a.item, a.sojourn, a.congested), ((7, 1), ms(5), false));
    let b = q.pop(t0 + ms(5)).expect("second");
    assert_eq!((b.item, b.sojourn), ((7, 2), ms(4)));
    assert!(q.pop(t0 + ms(5)).is_none());
    assert!(q.is_empty());
    assert_eq!((q.bytes(), q.active_flows()), (0, 0));
}

#[test]
fn flows_take_turns_a_quantum_each() {
    let t0 = origin();
    let mut q = queues(1_000_000);
    // Flow 1 queues ten packets before flow 2 queues its first.
    for i in 0..10 {
        q.push(1, (1, i), 1500, t0);
    }
    for i in 0..10 {
        q.push(2, (2, i), 1500, t0);
    }
    let order = drain(&mut q, t0);
    assert_eq!(order.len(), 20);
    // Taking turns (a quantum is a little more than one packet), not ten of flow 1 first.
    assert_eq!(&order[..4], &[1, 1, 2, 2]);
    assert_eq!(order[..8].iter().filter(|&&k| k == 1).count(), 4);
}

#[test]
fn large_items_wait_for_their_deficit() {
    let t0 = origin();
    let mut q = queues(10_000_000);
    // Flow 1 sends 64 KiB trains, flow 2 full-size packets: per byte they get equal shares.
    for i in 0..4 {
        q.push(1, (1, i), 64 * 1024, t0);
    }
    for i in 0..200 {
        q.push(2, (2, i), 1500, t0);
    }
    let order = drain(&mut q, t0);
    let first_big = order.iter().position(|&k| k == 1).expect("flow 1 served");
    let second_big = order[first_big + 1..]
        .iter()
        .position(|&k| k == 1)
        .expect("flow 1 served again");
    // Between two 64 KiB trains flow 2 sends about 64 KiB of 1500-byte packets.
    assert!(
        (35..=50).contains(&second_big),
        "flow 2 sent {second_big} packets between two trains"
    );
}

#[test]
fn overflow_drops_from_the_fattest_flow() {
    let t0 = origin();
    let mut q = queues(10 * 1500);
    for i in 0..8 {
        assert!(q.push(1, (1, i), 1500, t0).is_empty());
    }
    q.push(2, (2, 0), 1500, t0);
    q.push(3, (3, 0), 1500, t0);
    // Full: the next packet of the thin flow 2 pushes out flow 1's oldest, not flow 2's.
    assert_eq!(q.push(2, (2, 1), 1500, t0), vec![(1, 0)]);
    assert_eq!(q.push(3, (3, 1), 1500, t0), vec![(1, 1)]);
    assert_eq!(q.bytes(), 10 * 1500);
    let order = drain(&mut q, t0);
    assert_eq!(order.iter().filter(|&&k| k == 2).count(), 2);
    assert_eq!(order.iter().filter(|&&k| k == 3).count(), 2);
    assert_eq!(order.iter().filter(|&&k| k == 1).count(), 6);
}

#[test]
fn one_item_larger_than_the_limit_still_fits_alone() {
    let t0 = origin();
    let mut q = queues(2500);
    q.push(1, (1, 0), 1000, t0);
    q.push(2, (2, 0), 1000, t0);
    let mut dropped = q.push(3, (3, 0), 9000, t0);
    dropped.sort_unstable();
    assert_eq!(dropped, vec![(1, 0), (2, 0)]);
    assert_eq!(drain(&mut q, t0), vec![3]);
}

#[test]
fn codel_acts_per_flow() {
    let t0 = origin();
    let mut q = queues(100_000_000);
    // Flow 1 keeps a standing queue (each packet waits 10 ms); flow 2 is served at once.
    let mut t = t0;
    let mut congested = [0u32; 3];
    for step in 0..400u32 {
        for k in 0..4 {
            q.push(1, (1, step * 4 + k), 1500, t - ms(10));
        }
        q.push(2, (2, step), 1500, t);
        for _ in 0..2 {
            if let Some(d) = q.pop(t) {
                congested[d.item.0 as usize] += u32::from(d.congested);
            }
        }
        t += ms(1);
    }
    assert!(congested[1] > 0, "the standing flow is never picked");
    assert_eq!(congested[2], 0, "the prompt flow is picked");
}

#[test]
fn many_flows_share_a_fixed_number_of_queues() {
    let t0 = origin();
    let mut q = queues(100_000_000);
    for k in 0..1000u64 {
        q.push(k, (k, 0), 100, t0);
    }
    assert_eq!(q.active_flows(), FLOW_QUEUES);
    assert_eq!(drain(&mut q, t0).len(), 1000);
    assert_eq!(q.active_flows(), 0);
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

#[test]
fn flow_key_separates_five_tuples_and_ignores_payload() {
    let a = ipv4(6, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 5201);
    let b = ipv4(6, [10, 0, 0, 1], [10, 0, 0, 2], 40001, 5201);
    let c = ipv4(17, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 5201);
    assert_ne!(flow_key(&a), flow_key(&b));
    assert_ne!(flow_key(&a), flow_key(&c));
    let mut a2 = a.clone();
    a2[40] = 0xff; // payload
    a2[2] = 0x05; // total length
    assert_eq!(flow_key(&a), flow_key(&a2));
    assert_eq!(flow_key(&[]), 0);
    assert_eq!(flow_key(&[0x45, 0, 0]), 0);
    let mut v6 = vec![0u8; 44];
    v6[0] = 0x60;
    v6[6] = 6;
    assert_ne!(flow_key(&v6), 0);
}
