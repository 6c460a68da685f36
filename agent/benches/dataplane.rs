//! Micro-benchmarks of the agent's per-packet work: WireGuard encapsulation and decapsulation
//! (`dataplane::tunnel::Tunnel`, i.e. boringtun) per packet size, and the demultiplexer
//! (`dataplane::demux::classify`). `cargo bench -p rally-agent --bench dataplane`.
//!
//! Besides criterion's own report, each group prints a ratio against a baseline measured in
//! the same run, interleaved: encapsulate/decapsulate against a `memcpy` of the same size (how
//! many copies one packet's crypto costs), classify against decapsulating a full-size packet
//! (its share of the per-packet cost).

use std::hint::black_box;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use rally_agent::dataplane::demux::{classify, receiver_index};
use rally_agent::dataplane::tunnel::{Output, Tunnel};

/// IPv4 packet sizes: a small game/VoIP packet, a medium one, a full TUN MTU (1420).
const SIZES: [usize; 3] = [64, 512, 1420];
const BUF: usize = 2048;

/// Two tunnels with a finished handshake: `a` (the initiator) may send to `b`.
fn pair() -> (Tunnel, Tunnel) {
    let sa = StaticSecret::from([1u8; 32]);
    let sb = StaticSecret::from([2u8; 32]);
    let mut a = Tunnel::new(sa.clone(), PublicKey::from(&sb), None, 1);
    let mut b = Tunnel::new(sb, PublicKey::from(&sa), None, 2);
    let mut buf = vec![0u8; BUF];
    let mut buf2 = vec![0u8; BUF];
    let Ok(Output::Network(init)) = a.handshake(&mut buf, true) else {
        panic!("no handshake initiation")
    };
    let init = init.to_vec();
    let Ok(Output::Network(resp)) = b.decapsulate(None, &init, &mut buf) else {
        panic!("no handshake response")
    };
    let resp = resp.to_vec();
    // The initiator takes the response (and may answer with a keepalive, which b takes).
    if let Ok(Output::Network(ka)) = a.decapsulate(None, &resp, &mut buf) {
        let ka = ka.to_vec();
        let _ = b.decapsulate(None, &ka, &mut buf2);
    }
    (a, b)
}

/// An IPv4 packet of `len` bytes from 10.66.0.2 to 10.66.0.3.
fn ipv4(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 66, 0, 2]);
    p[16..20].copy_from_slice(&[10, 66, 0, 3]);
    p
}

/// `a` encrypts `packet`; returns the datagram.
fn encrypt(a: &mut Tunnel, packet: &[u8], buf: &mut [u8]) -> Vec<u8> {
    match a.encapsulate(packet, buf) {
        Ok(Output::Network(d)) => d.to_vec(),
        other => panic!("encapsulate: {other:?}"),
    }
}

fn memcpy(dst: &mut [u8], src: &[u8]) {
    dst[..src.len()].copy_from_slice(black_box(src));
    black_box(&dst[..src.len()]);
}

fn bench_tunnel(c: &mut Criterion) {
    let mut g = c.benchmark_group("tunnel");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let packet = ipv4(size);
        let (mut a, _) = pair();
        let mut out = vec![0u8; BUF];
        g.bench_with_input(BenchmarkId::new("encapsulate", size), &packet, |bch, p| {
            bch.iter(|| {
                let r = a.encapsulate(black_box(p), &mut out);
                black_box(matches!(r, Ok(Output::Network(_))))
            })
        });
        let (mut a, mut b) = pair();
        let mut enc = vec![0u8; BUF];
        let mut dec = vec![0u8; BUF];
        g.bench_with_input(BenchmarkId::new("decapsulate", size), &packet, |bch, p| {
            bch.iter_batched(
                || encrypt(&mut a, p, &mut enc),
                |d| {
                    let r = b.decapsulate(None, black_box(&d), &mut dec);
                    black_box(matches!(r, Ok(Output::Tunnel(..))))
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("memcpy", size), &packet, |bch, p| {
            bch.iter(|| memcpy(&mut out, p))
        });
    }
    g.finish();
}

fn bench_demux(c: &mut Criterion) {
    let (mut a, _) = pair();
    let mut buf = vec![0u8; BUF];
    let data = encrypt(&mut a, &ipv4(1420), &mut buf);
    let mut stun = vec![0u8; 32];
    stun[..2].copy_from_slice(&[0x01, 0x01]);
    stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    let relay = rally_proto::relay::RelayMsg::Deliver {
        from: [1; 8],
        payload: &data,
    }
    .to_vec();
    let mut g = c.benchmark_group("demux");
    for (name, d) in [
        ("wireguard data", &data),
        ("stun response", &stun),
        ("relay deliver", &relay),
    ] {
        g.bench_with_input(BenchmarkId::new("classify", name), d, |bch, d| {
            bch.iter(|| black_box(classify(black_box(d))))
        });
    }
    g.bench_function("receiver_index/wireguard data", |bch| {
        bch.iter(|| black_box(receiver_index(black_box(&data))))
    });
    g.finish();
}

/// Nanoseconds per call of `f` over `n` calls.
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

/// Interleaved rounds of target and baseline; prints medians and the median per-round ratio.
fn print_ratios() {
    const ROUNDS: usize = 15;
    const N: usize = 4000;
    println!("\nratios against baselines measured in the same run ({ROUNDS} interleaved rounds of {N} calls; medians):");
    let mut decap_1420 = 0.0;
    for size in SIZES {
        let packet = ipv4(size);
        let (mut a, mut b) = pair();
        let (mut out, mut dec) = (vec![0u8; BUF], vec![0u8; BUF]);
        let (mut enc_ns, mut dec_ns, mut cpy_ns, mut re, mut rd) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            let e = per_call(N, || {
                black_box(a.encapsulate(black_box(&packet), &mut out).is_ok());
            });
            let datagrams: Vec<Vec<u8>> =
                (0..N).map(|_| encrypt(&mut a, &packet, &mut out)).collect();
            let mut it = datagrams.iter();
            let d = per_call(N, || {
                let Some(x) = it.next() else { return };
                black_box(b.decapsulate(None, black_box(x), &mut dec).is_ok());
            });
            let m = per_call(N, || memcpy(&mut out, &packet));
            enc_ns.push(e);
            dec_ns.push(d);
            cpy_ns.push(m);
            re.push(e / m);
            rd.push(d / m);
        }
        let (e, d, m) = (median(enc_ns), median(dec_ns), median(cpy_ns));
        if size == 1420 {
            decap_1420 = d;
        }
        println!(
            "  {size:>5} B: encapsulate {e:8.1} ns ({:6.1}× memcpy), decapsulate {d:8.1} ns ({:6.1}× memcpy), memcpy {m:6.1} ns; {:.0} / {:.0} MB/s",
            median(re),
            median(rd),
            size as f64 * 1e3 / e,
            size as f64 * 1e3 / d
        );
    }
    let (mut a, _) = pair();
    let mut buf = vec![0u8; BUF];
    let data = encrypt(&mut a, &ipv4(1420), &mut buf);
    let c = median(
        (0..ROUNDS)
            .map(|_| {
                per_call(N * 50, || {
                    black_box(classify(black_box(&data)));
                })
            })
            .collect(),
    );
    println!(
        "  classify (wireguard data): {c:.2} ns = {:.3}% of decapsulating a 1420 B packet",
        100.0 * c / decap_1420.max(1e-9)
    );
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    bench_tunnel(&mut c);
    bench_demux(&mut c);
    c.final_summary();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list") {
        print_ratios();
    }
}
