//! `tcp-relay`: the relay path over TLS/TCP (`relay-tcp:r1`) next to the same relay over UDP
//! (`relay:r1`), between two agents behind home routers (20 ms per uplink); agent a's router
//! blocks UDP for the TCP runs. Per run:
//! - a one-way stream of 60 datagrams/s of 200 bytes a → b for [`STREAM`] with 1 % loss on
//!   a's uplink: the p99 one-way delay (the namespaces share one clock), against the
//!   agent-to-relay WAN RTT + 50 ms (the bound);
//! - one-stream TCP throughput (iperf3 a → b and b → a, no loss).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};

use super::datapath::{iperf, parse_ping_times};
use super::stats::{median, quantile, Figure};
use super::tunnels::{Path, Subject};
use super::Options;
use crate::relay_tcp::start_tcp_relay;
use crate::{netns, Agent, ControlPlane, Host, Lab, NatKind, WanProfile};

const LIMIT: Duration = Duration::from_secs(30);
/// How long each delay stream runs.
const STREAM: Duration = Duration::from_secs(15);
const RATE_PPS: u32 = 60;
const DATAGRAM: usize = 200;
const STREAM_PORT: u16 = 47_100;

pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

struct Side {
    p99: Vec<f64>,
    delivered: Vec<f64>,
    mbps: Vec<f64>,
    /// b → a (the relay sends to agent a).
    mbps_back: Vec<f64>,
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let c = lab.add_wan_host("control")?;
    let relay_host = lab.add_wan_host("relay")?;
    let (key, _) = ControlPlane::init(&c, lab)?;
    let relay = start_tcp_relay(&relay_host, "r1", &key)?;
    let cp = ControlPlane::start_on_port(&c, lab, &[relay.spec()], &[], 443)?;
    let gw_a = lab.add_router("ga", NatKind::HomeRouter)?;
    let gw_b = lab.add_router("gb", NatKind::HomeRouter)?;
    let (ha, hb) = (
        lab.add_host_behind(&gw_a, "a")?,
        lab.add_host_behind(&gw_b, "b")?,
    );
    let a = Agent::start(&ha, "a", cp.control())?;
    let b = Agent::start(&hb, "b", cp.control())?;
    a.wait_control_connected(LIMIT)?;
    b.wait_control_connected(LIMIT)?;
    let code = a.party_create("bench", &[])?;
    crate::host::check_success(&b.party_join(&code)?, "rally party join")?;
    a.wait_for_peers(&["b"], LIMIT)?;
    b.wait_for_peers(&["a"], LIMIT)?;
    // Both on the relay over UDP (pinned: the direct path would win otherwise).
    for (x, peer) in [(&a, "b"), (&b, "a")] {
        wait_path(lab, x, peer, |p| p.starts_with("relay:"))?;
        x.rally_ok(&["path", "set-primary", peer, "relay:r1"])?;
    }
    let wan_rtt = ping_median(&ha, &relay_host.ip().to_string())?;
    println!("    WAN RTT agent a ↔ relay: {wan_rtt:.1} ms");
    let vip_b = b.virtual_ip()?;
    let path = Path {
        subject: Subject::RallyRelay,
        client: ha.clone(),
        server: hb.clone(),
        target: vip_b,
        pids: Vec::new(),
    };
    let udp = measure_side(lab, &gw_a, &path, opts, "relay:r1")?;
    gw_a.set_udp_blocked(true)?;
    wait_path(lab, &a, "b", |p| p == "relay-tcp:r1")?;
    let tcp = measure_side(lab, &gw_a, &path, opts, "relay-tcp:r1")?;
    gw_a.set_udp_blocked(false)?;

    let bound: Vec<f64> = vec![wan_rtt + 50.0; opts.runs];
    let what = "one-way delay p99, 60 pps × 200 B, 1 % WAN loss";
    let mut f1 = Figure::new("tcp-relay", what, "rally relay-tcp", "ms", tcp.p99.clone());
    f1.ratio_to("WAN RTT + 50 ms", &bound);
    let mut f2 = Figure::new(
        "tcp-relay",
        what,
        "rally relay (UDP)",
        "ms",
        udp.p99.clone(),
    );
    f2.ratio_to("WAN RTT + 50 ms", &bound);
    let what = "stream delivered, 1 % WAN loss";
    let f3 = Figure::new("tcp-relay", what, "rally relay-tcp", "%", tcp.delivered);
    let f4 = Figure::new("tcp-relay", what, "rally relay (UDP)", "%", udp.delivered);
    let what = "tcp 1 stream a→b";
    let mut f5 = Figure::new("tcp-relay", what, "rally relay-tcp", "Mbit/s", tcp.mbps);
    f5.ratio_to("rally relay (UDP)", &udp.mbps);
    let f6 = Figure::new("tcp-relay", what, "rally relay (UDP)", "Mbit/s", udp.mbps);
    let what = "tcp 1 stream b→a";
    let mut f8 = Figure::new(
        "tcp-relay",
        what,
        "rally relay-tcp",
        "Mbit/s",
        tcp.mbps_back,
    );
    f8.ratio_to("rally relay (UDP)", &udp.mbps_back);
    let f9 = Figure::new(
        "tcp-relay",
        what,
        "rally relay (UDP)",
        "Mbit/s",
        udp.mbps_back,
    );
    let f7 = Figure::new(
        "tcp-relay",
        "WAN RTT agent ↔ relay (baseline)",
        "raw WAN",
        "ms",
        vec![wan_rtt],
    );
    Ok(vec![f1, f2, f3, f4, f5, f6, f8, f9, f7])
}

fn measure_side(
    lab: &Lab,
    gw: &crate::Router,
    path: &Path,
    opts: &Options,
    label: &str,
) -> Result<Side> {
    let mut side = Side {
        p99: Vec::new(),
        delivered: Vec::new(),
        mbps: Vec::new(),
        mbps_back: Vec::new(),
    };
    let clean = lab.wan(gw)?;
    for run in 1..=opts.runs {
        lab.set_wan(
            gw,
            WanProfile {
                loss: 0.01,
                ..clean
            },
        )?;
        let r = one_way_stream(&path.client, &path.server, path.target.into());
        lab.set_wan(gw, clean)?;
        let (delays, sent) = r?;
        let p99 = quantile(&delays, 0.99).unwrap_or(f64::NAN);
        let delivered = 100.0 * delays.len() as f64 / f64::from(sent.max(1));
        let mbps = iperf(path, 1, false, opts.seconds).unwrap_or(f64::NAN);
        let back = iperf(path, 1, true, opts.seconds).unwrap_or(f64::NAN);
        println!(
            "    {label} run {run}/{}: one-way p99 {p99:.1} ms (median {:.1}), delivered \
             {delivered:.1} %, tcp 1 stream {mbps:.1} Mbit/s, b→a {back:.1} Mbit/s",
            opts.runs,
            median(&delays).unwrap_or(f64::NAN)
        );
        side.p99.push(p99);
        side.delivered.push(delivered);
        side.mbps.push(mbps);
        side.mbps_back.push(back);
    }
    Ok(side)
}

/// Sends [`RATE_PPS`] datagrams of [`DATAGRAM`] bytes a second from `from` to `to` for
/// [`STREAM`]; returns the one-way delays (ms) of those that arrived, and how many were sent.
fn one_way_stream(from: &Host, to: &Host, dst_ip: std::net::IpAddr) -> Result<(Vec<f64>, u32)> {
    let dst = SocketAddr::new(dst_ip, STREAM_PORT);
    let rx = netns::in_ns(to.ns(), || {
        let s = UdpSocket::bind(("0.0.0.0", STREAM_PORT)).context("binding the receiver")?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    })?;
    let tx = netns::in_ns(from.ns(), || Ok(UdpSocket::bind(("0.0.0.0", 0))?))?;
    let stop = Arc::new(AtomicBool::new(false));
    let delays = Arc::new(Mutex::new(Vec::new()));
    let (halt, got) = (stop.clone(), delays.clone());
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !halt.load(Ordering::SeqCst) {
            if let Ok((n, _)) = rx.recv_from(&mut buf) {
                if n >= 8 {
                    let sent =
                        f64::from_bits(u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()));
                    let d = (unix() - sent) * 1000.0;
                    got.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                }
            }
        }
    });
    let interval = Duration::from_secs(1) / RATE_PPS;
    let start = Instant::now();
    let mut sent = 0u32;
    let mut buf = [0u8; DATAGRAM];
    while start.elapsed() < STREAM {
        let due = start + interval * sent;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        buf[..8].copy_from_slice(&unix().to_bits().to_be_bytes());
        let _ = tx.send_to(&buf, dst);
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    receiver
        .join()
        .map_err(|_| anyhow!("the receiver thread panicked"))?;
    let delays = delays.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((delays, sent))
}

fn ping_median(host: &Host, ip: &str) -> Result<f64> {
    let out = host.run(&["ping", "-n", "-c", "5", "-i", "0.2", ip])?;
    median(&parse_ping_times(&String::from_utf8_lossy(&out.stdout)))
        .ok_or_else(|| anyhow!("no ping reply from {ip}"))
}

fn wait_path(lab: &Lab, agent: &Agent, peer: &str, want: impl Fn(&str) -> bool) -> Result<()> {
    lab.wait_until(
        &format!("{}'s path to {peer}", agent.name()),
        LIMIT,
        Duration::from_millis(100),
        || {
            let peers = agent.peers_json()?;
            let path = peers
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
                .and_then(|p| p["path"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Ok(want(&path))
        },
    )
}

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
