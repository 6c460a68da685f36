//! Micro-benchmark of the agent taking a peer-map change from the control plane while it holds
//! 1000 peers: decoding the frame and applying it to `rally_proto::PeerView`, which yields the
//! per-peer events the data plane applies (a hash-map update per event). `cargo bench -p
//! rally-agent --bench peermap`.
//!
//! Target: a one-peer delta (an endpoint change, or a peer added then removed). Baseline,
//! measured in the same run, interleaved: the same information as a full 1000-peer map (what
//! every change cost before deltas, before the data plane even looked at it). Besides
//! criterion's report, the ratio of the two is printed, with the absolute time of a one-peer
//! change against the 1 ms goal.

use std::cell::Cell;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use rally_proto::{frame, Key32, PeerChange, PeerInfo, PeerView, ServerMsg};

/// Peers the agent holds.
const PEERS: usize = 1000;

fn key(i: usize, salt: u8) -> Key32 {
    let mut k = [salt; 32];
    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Key32(k)
}

/// A peer as the control plane describes it: two endpoints, one party, no NAT report.
fn peer(i: usize) -> PeerInfo {
    PeerInfo {
        peer_id: key(i, 1),
        name: format!("peer-{i}"),
        wg_key: key(i, 2),
        virtual_ip: Ipv4Addr::new(10, 66, (i / 250) as u8, (i % 250 + 2) as u8),
        endpoints: vec![
            SocketAddr::from(([192, 168, 1, 10], 51820)),
            SocketAddr::from(([198, 51, 100, (i % 250) as u8], 40000 + (i % 1000) as u16)),
        ],
        parties: vec!["crowd".into()],
        nat: None,
    }
}

fn peers() -> Vec<PeerInfo> {
    (0..PEERS).map(peer).collect()
}

/// A view at version 1 holding [`PEERS`] peers.
fn view() -> PeerView {
    let mut v = PeerView::new();
    v.handle_full(1, peers());
    v
}

/// The `n`-th one-peer change after version 1: peer 7's endpoint moves, or a new peer comes
/// and goes, in turn.
fn one_change(n: u64) -> PeerChange {
    match n % 3 {
        0 => {
            let mut p = peer(7);
            p.endpoints[1].set_port(1000 + (n % 50_000) as u16);
            PeerChange::Upsert { peer: p }
        }
        1 => PeerChange::Upsert { peer: peer(PEERS) },
        _ => PeerChange::Remove {
            peer_id: peer(PEERS).peer_id,
        },
    }
}

fn delta_frame(version: u64) -> Vec<u8> {
    frame::encode(&ServerMsg::PeerDelta {
        version,
        changes: vec![one_change(version)],
    })
}

/// A full map carrying one change against [`view`]'s peers.
fn full_frame(version: u64) -> Vec<u8> {
    let mut peers = peers();
    peers[7].endpoints[1].set_port(1000 + (version % 50_000) as u16);
    frame::encode(&ServerMsg::PeerMap { version, peers })
}

/// Decodes a frame and applies it; returns how many peer events the data plane gets.
fn take(view: &mut PeerView, bytes: &[u8]) -> usize {
    match frame::decode::<ServerMsg>(bytes) {
        Ok(ServerMsg::PeerDelta { version, changes }) => {
            match view.handle_delta(version, changes) {
                Ok(events) => events.len(),
                Err(e) => panic!("{e}"),
            }
        }
        Ok(ServerMsg::PeerMap { version, peers }) => view.handle_full(version, peers).len(),
        other => panic!("unexpected {other:?}"),
    }
}

fn bench_peermap(c: &mut Criterion) {
    let mut g = c.benchmark_group("peermap (1000 peers held)");
    let mut v = view();
    let next = Cell::new(2u64);
    g.bench_function("one-peer delta: decode + apply", |b| {
        b.iter_batched(
            || {
                let n = next.get();
                next.set(n + 1);
                delta_frame(n)
            },
            |f| black_box(take(&mut v, black_box(&f))),
            BatchSize::SmallInput,
        )
    });
    let mut v = view();
    let fulls = [full_frame(2), full_frame(3)];
    let mut i = 0;
    g.bench_function("full 1000-peer map: decode + apply (baseline)", |b| {
        b.iter(|| {
            i ^= 1;
            black_box(take(&mut v, black_box(&fulls[i])))
        })
    });
    g.finish();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Interleaved rounds of one-peer deltas and full maps; prints medians and the median ratio.
fn print_ratio() {
    const ROUNDS: usize = 15;
    const DELTAS: usize = 3000;
    const FULLS: usize = 20;
    let (mut delta_ns, mut full_ns, mut ratios) = (vec![], vec![], vec![]);
    let mut dv = view();
    let mut fv = view();
    let mut version = 2u64;
    for _ in 0..ROUNDS {
        let frames: Vec<Vec<u8>> = (0..DELTAS)
            .map(|i| delta_frame(version + i as u64))
            .collect();
        version += DELTAS as u64;
        let t = Instant::now();
        for f in &frames {
            black_box(take(&mut dv, black_box(f)));
        }
        let d = t.elapsed().as_nanos() as f64 / DELTAS as f64;
        let fulls: Vec<Vec<u8>> = (0..FULLS).map(|i| full_frame(i as u64)).collect();
        let t = Instant::now();
        for f in &fulls {
            black_box(take(&mut fv, black_box(f)));
        }
        let m = t.elapsed().as_nanos() as f64 / FULLS as f64;
        delta_ns.push(d);
        full_ns.push(m);
        ratios.push(m / d);
    }
    let (d, m) = (median(delta_ns), median(full_ns));
    println!(
        "\npeer map with {PEERS} peers ({ROUNDS} interleaved rounds; medians):\n  \
         one-peer delta (decode + apply): {:8.2} µs  ({:.4} of the 1 ms goal)\n  \
         full {PEERS}-peer map (baseline):  {:8.2} µs\n  \
         full map / one-peer delta: {:.0}×",
        d / 1e3,
        d / 1e6,
        m / 1e3,
        median(ratios)
    );
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    bench_peermap(&mut c);
    c.final_summary();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list") {
        print_ratio();
    }
}
