//! Micro-benchmark of the relay's forwarding function: `Relay::handle_datagram` on a `Send`
//! between two bound sessions of one party (rewritten in place into a `Deliver`), with 2 and
//! with 1000 sessions bound. `cargo bench -p rally-relay --bench forward`.
//!
//! Besides criterion's report, it prints the ratio against a baseline measured in the same
//! run, interleaved: the least any forwarder must do per packet — look the destination up in
//! a hash map and rewrite the header (`send_to_deliver`).

// A benchmark reads the clock to time things; the core under test still gets `now` passed in.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use rally_proto::identity::Identity;
use rally_proto::relay::{
    bind_transcript, send_to_deliver, short_id, write_send_header, RelayMsg, ShortId, DOMAIN_BIND,
};
use rally_proto::RelayToken;
use rally_relay::{Action, Config, Relay, Via};

/// Datagram size (relay header included).
const SIZES: [usize; 2] = [128, 1200];
const UNIX: u64 = 1_800_000_000;

/// The i-th agent's address (values only: the core is sans-IO).
fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
        40_000,
    )
}

fn seed(i: usize) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    s[31] = 0xa5;
    s
}

/// A relay with `sessions` agents bound (all in one party); returns it, the time, and the
/// first two agents' addresses and short ids.
fn bound_relay(sessions: usize) -> (Relay, Instant, Vec<(SocketAddr, ShortId)>) {
    let control = Identity::from_seed([7; 32]);
    let mut cfg = Config::new(
        control.public(),
        "198.51.100.11:3478".parse().expect("addr"),
    );
    cfg.limits.max_pps = 1 << 50;
    cfg.limits.max_bps = 1 << 60;
    cfg.limits.max_sessions = sessions + 10;
    let now = Instant::now();
    let mut relay = Relay::new(cfg, [3; 32], now);
    let mut agents = Vec::new();
    for i in 0..sessions {
        let id = Identity::from_seed(seed(i));
        let src = addr(i);
        let mut req = RelayMsg::BindRequest.to_vec();
        let Action::Reply(t) = relay.handle_datagram(Via::Primary, src, &mut req, now, UNIX) else {
            panic!("no challenge")
        };
        let Ok(RelayMsg::BindChallenge { cookie }) = RelayMsg::decode(&t.payload) else {
            panic!("not a challenge")
        };
        let token = RelayToken {
            agent: id.public(),
            expires_at: UNIX + 3600,
            parties: vec![[1; 8]],
        }
        .sign(&control);
        let signature = id.sign(DOMAIN_BIND, &bind_transcript(&cookie, &token));
        let mut bind = RelayMsg::Bind {
            cookie,
            signature,
            token: &token,
        }
        .to_vec();
        match relay.handle_datagram(Via::Primary, src, &mut bind, now, UNIX) {
            Action::Reply(_) => {}
            other => panic!("bind {i} refused: {other:?}"),
        }
        agents.push((src, short_id(&id.public())));
    }
    (relay, now, agents)
}

/// The minimal forwarder: destination by short id, sender's id by address, header rewrite.
struct Minimal {
    by_id: HashMap<ShortId, SocketAddr>,
    by_addr: HashMap<SocketAddr, ShortId>,
}

impl Minimal {
    fn new(agents: &[(SocketAddr, ShortId)]) -> Self {
        Minimal {
            by_id: agents.iter().map(|(a, s)| (*s, *a)).collect(),
            by_addr: agents.iter().map(|(a, s)| (*a, *s)).collect(),
        }
    }

    fn forward(&self, src: SocketAddr, d: &mut [u8]) -> Option<SocketAddr> {
        let from = self.by_addr.get(&src)?;
        let to = send_to_deliver(d, from)?;
        self.by_id.get(&to).copied()
    }
}

fn datagram(size: usize, to: &ShortId) -> Vec<u8> {
    let mut d = vec![0u8; size];
    write_send_header(&mut d, to);
    d
}

fn bench_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay");
    for sessions in [2usize, 1000] {
        let (mut relay, now, agents) = bound_relay(sessions);
        let minimal = Minimal::new(&agents);
        let (src, _) = agents[0];
        let (_, to) = agents[1];
        for size in SIZES {
            g.throughput(Throughput::Elements(1));
            let mut d = datagram(size, &to);
            let id = format!("{sessions} sessions/{size} B");
            g.bench_function(BenchmarkId::new("handle_datagram(send)", &id), |b| {
                b.iter(|| {
                    write_send_header(&mut d, &to);
                    let a = relay.handle_datagram(Via::Primary, src, black_box(&mut d), now, UNIX);
                    black_box(matches!(a, Action::Forward { .. }))
                })
            });
            g.bench_function(BenchmarkId::new("minimal forward (baseline)", &id), |b| {
                b.iter(|| {
                    write_send_header(&mut d, &to);
                    black_box(minimal.forward(src, black_box(&mut d)))
                })
            });
        }
    }
    g.finish();
}

fn per_call(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_ratios() {
    const ROUNDS: usize = 15;
    const N: usize = 200_000;
    println!("\nratios against a baseline measured in the same run ({ROUNDS} interleaved rounds of {N} calls; medians):");
    for sessions in [2usize, 1000] {
        let (mut relay, now, agents) = bound_relay(sessions);
        let minimal = Minimal::new(&agents);
        let (src, _) = agents[0];
        let (_, to) = agents[1];
        for size in SIZES {
            let mut d = datagram(size, &to);
            let (mut r_ns, mut m_ns, mut ratio) = (vec![], vec![], vec![]);
            for _ in 0..ROUNDS {
                let r = per_call(N, || {
                    write_send_header(&mut d, &to);
                    let a = relay.handle_datagram(Via::Primary, src, black_box(&mut d), now, UNIX);
                    assert!(matches!(a, Action::Forward { .. }));
                });
                let m = per_call(N, || {
                    write_send_header(&mut d, &to);
                    black_box(minimal.forward(src, black_box(&mut d)));
                });
                r_ns.push(r);
                m_ns.push(m);
                ratio.push(r / m);
            }
            let r = median(r_ns);
            println!(
                "  {sessions:>4} sessions, {size:>4} B: handle_datagram {r:6.1} ns ({:.1} Mpps per core in the core alone), minimal forward {:5.1} ns; {:.1}× the baseline",
                1e3 / r,
                median(m_ns),
                median(ratio)
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    bench_forward(&mut c);
    c.final_summary();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list") {
        print_ratios();
    }
}
