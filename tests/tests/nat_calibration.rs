//! Calibration of the lab itself: every NAT recipe maps and filters the way its name promises,
//! and the WAN emulator adds the delay and loss it is told to. Real STUN over real UDP sockets
//! (`rally-lab stun-server`, `stun-probe`, `udp-send`) in the lab's namespaces; needs root.
//! Each test prints what it measured (`cargo test -p rally-lab --test nat_calibration --
//! --nocapture`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use rally_lab::ping::{parse_rtt_stats, parse_summary, PingSummary, RttStats};
use rally_lab::stun::{self, ProbeOptions, ProbeResult, RunningProbe, StunServer};
use rally_lab::{Host, Lab, NatKind, Router, Site, WanProfile};

/// The inside host's STUN socket for the mapping check.
const MAPPING_PORT: u16 = 40000;
/// The inside host's socket for the filtering check.
const FILTERING_PORT: u16 = 40001;
/// The port the contacted peer and the stranger send from.
const PEER_PORT: u16 = 9000;
/// How long the filtering probe listens for datagrams from outside.
const LISTEN: Duration = Duration::from_millis(1500);

#[test]
fn home_router_maps_endpoint_independently_and_lets_in_only_replies() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::HomeRouter)?;

    let [a, b] = nat.mapped_from_one_socket(MAPPING_PORT)?;
    assert_eq!(a.ip(), IpAddr::V4(nat.router.wan_ip()));
    assert_eq!(a.port(), b.port(), "endpoint-independent mapping");
    assert_eq!(a.port(), MAPPING_PORT, "masquerade keeps the source port");

    let heard = nat.unsolicited_and_replies()?;
    assert!(heard.from_contacted_peer, "a reply from a contacted peer");
    assert!(!heard.from_peer_other_port, "port-dependent filtering");
    assert!(!heard.from_stranger, "address-dependent filtering");
    report(NatKind::HomeRouter, &nat, [a, b], &heard, started);
    Ok(())
}

#[test]
fn symmetric_nat_maps_each_destination_to_its_own_port() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::Symmetric)?;

    let [a, b] = nat.mapped_from_one_socket(MAPPING_PORT)?;
    assert_eq!(a.ip(), IpAddr::V4(nat.router.wan_ip()));
    assert_eq!(b.ip(), IpAddr::V4(nat.router.wan_ip()));
    assert_ne!(a.port(), b.port(), "endpoint-dependent mapping");

    // The hello to the peer left from yet another port, so even the peer cannot reach the port
    // the STUN server saw.
    let heard = nat.unsolicited_and_replies()?;
    assert!(
        !heard.from_contacted_peer,
        "the peer reached the STUN mapping"
    );
    assert!(!heard.from_peer_other_port, "port-dependent filtering");
    assert!(!heard.from_stranger, "address-dependent filtering");
    report(NatKind::Symmetric, &nat, [a, b], &heard, started);
    Ok(())
}

#[test]
fn full_cone_maps_and_filters_endpoint_independently() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::FullCone)?;

    let [a, b] = nat.mapped_from_one_socket(MAPPING_PORT)?;
    assert_eq!(a.ip(), IpAddr::V4(nat.router.wan_ip()));
    assert_eq!(a.port(), b.port(), "endpoint-independent mapping");

    let heard = nat.unsolicited_and_replies()?;
    assert!(heard.from_contacted_peer, "a reply from a contacted peer");
    assert!(heard.from_peer_other_port, "endpoint-independent filtering");
    assert!(heard.from_stranger, "endpoint-independent filtering");
    report(NatKind::FullCone, &nat, [a, b], &heard, started);
    Ok(())
}

#[test]
fn full_cone_keeps_two_inside_hosts_on_the_same_port_apart() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::FullCone)?;
    let second = nat.lab.add_host_behind(&nat.router, "second")?;

    // Both inside hosts send from the same local port: masquerade must give the second
    // another external port, and the map (keyed by the external port) must keep them apart.
    let mut opts = ProbeOptions::new(&nat.server_addrs()[..1], FILTERING_PORT);
    opts.listen = LISTEN;
    let probes = [
        RunningProbe::start(&nat.inside, &opts)?,
        RunningProbe::start(&second, &opts)?,
    ];
    let mut mapped = Vec::new();
    for p in &probes {
        let m = p.wait_mapped()?[0].mapped;
        mapped.push(m.ok_or_else(|| anyhow!("no STUN answer"))?);
    }
    assert_ne!(
        mapped[0], mapped[1],
        "two inside sockets on one external port"
    );
    for (i, to) in mapped.iter().enumerate() {
        stun::udp_send(&nat.stranger, PEER_PORT, *to, &format!("for-{i}"), 3)?;
    }
    for (i, p) in probes.iter().enumerate() {
        let payloads: Vec<String> = p.wait_done()?.into_iter().map(|(_, p)| p).collect();
        assert!(
            payloads.contains(&format!("for-{i}")),
            "probe {i} heard {payloads:?}"
        );
        assert!(
            !payloads.contains(&format!("for-{}", 1 - i)),
            "probe {i} heard the other's datagram: {payloads:?}"
        );
    }
    println!(
        "calibration {}: two inside hosts on port {FILTERING_PORT} → {} and {}, each reachable \
         by a stranger ({:.1} s)",
        NatKind::FullCone,
        mapped[0],
        mapped[1],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn cgnat_over_a_home_router_keeps_one_mapping_on_the_carrier_address() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::Cgnat)?;
    let carrier = nat.router.carrier().expect("a cgnat router has a carrier");
    assert_eq!(nat.router.wan_ip(), carrier.wan_ip());
    assert!(
        nat.router.own_wan_ip().octets()[..2] == [100, 64],
        "home router's WAN {} is in 100.64.0.0/10",
        nat.router.own_wan_ip()
    );

    let [a, b] = nat.mapped_from_one_socket(MAPPING_PORT)?;
    assert_eq!(a.ip(), IpAddr::V4(carrier.wan_ip()));
    assert_eq!(a.port(), b.port(), "endpoint-independent mapping");

    let heard = nat.unsolicited_and_replies()?;
    assert!(heard.from_contacted_peer, "a reply from a contacted peer");
    assert!(!heard.from_stranger, "address-dependent filtering");
    report(NatKind::Cgnat, &nat, [a, b], &heard, started);
    Ok(())
}

#[test]
fn udp_blocked_network_gets_no_stun_answer() -> Result<()> {
    let started = Instant::now();
    let nat = NatLab::new(NatKind::UdpBlocked)?;

    let results = nat.probe(MAPPING_PORT)?;
    for r in &results {
        assert_eq!(
            r.mapped, None,
            "{} answered through a UDP-blocking router",
            r.server
        );
    }
    println!(
        "calibration {}: no STUN answer from {} servers ({:.1} s)",
        NatKind::UdpBlocked,
        results.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn wan_emulator_adds_delay_and_loss_on_demand_and_cuts_links() -> Result<()> {
    let started = Instant::now();
    let lab = Lab::new()?;
    let a = lab.add_router("a", NatKind::HomeRouter)?;
    let b = lab.add_router("b", NatKind::HomeRouter)?;
    assert_eq!(lab.wan(&a)?, WanProfile::default());

    // Two uplinks of 20 ms, crossed twice: 80 ms.
    let (rtt, _) = ping(&a, &b, 10, "0.2")?;
    assert!(rtt.min >= 70.0, "RTT {rtt:?} ms across two 20 ms uplinks");
    assert!(rtt.avg < 200.0, "RTT {rtt:?} ms across two 20 ms uplinks");
    println!("wan: default (2 × 20 ms one-way): RTT {rtt:?} ms");

    // +100 ms on a's uplink, at run time: 2 × (120 + 20) = 280 ms.
    lab.set_wan(&a, WanProfile::delay(Duration::from_millis(120)))?;
    let (slow, _) = ping(&a, &b, 5, "0.2")?;
    assert!(
        slow.min >= 270.0,
        "RTT {slow:?} ms with a at 120 ms one-way"
    );
    println!("wan: a at 120 ms one-way: RTT {slow:?} ms");

    // 5% loss each way on a's uplink: a round trip crosses it twice, ≈ 9.75% lost.
    lab.set_wan(&a, WanProfile::default().with_loss(0.05))?;
    let before = lab.wan_stats(&a)?;
    let (_, lossy) = ping(&a, &b, 200, "0.01")?;
    let after = lab.wan_stats(&a)?;
    let lost = (after.up.lost - before.up.lost) + (after.down.lost - before.down.lost);
    let passed =
        (after.up.forwarded - before.up.forwarded) + (after.down.forwarded - before.down.forwarded);
    println!(
        "wan: a at 5% loss: {}/{} pings answered ({:.1}% lost, expected ≈ 9.75%); emulator lost \
         {lost} of {} frames ({:.1}%)",
        lossy.received,
        lossy.transmitted,
        (1.0 - lossy.ratio()) * 100.0,
        lost + passed,
        lost as f64 * 100.0 / (lost + passed).max(1) as f64
    );
    assert!(lost > 0, "the emulator lost nothing at 5%");
    assert!(lossy.received < lossy.transmitted, "no ping lost at 5%");
    assert!(
        lossy.ratio() > 0.5,
        "{lossy:?}: far more lost than 5% per crossing"
    );

    // Cut: nothing passes between the two; restore: it does again.
    lab.set_wan(&a, WanProfile::default())?;
    lab.cut(&a, &b)?;
    let out = a.host().run(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        &b.wan_ip().to_string(),
    ])?;
    assert!(!out.status.success(), "ping crossed a cut link");
    lab.restore(&a, &b)?;
    let (back, _) = ping(&a, &b, 3, "0.2")?;
    println!(
        "wan: cut stopped every ping; restored RTT {back:?} ms ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn wan_emulator_delays_only_far_destinations_and_holds_nothing_else_back() -> Result<()> {
    let lab = Lab::new()?;
    let a = lab.add_router("a", NatKind::HomeRouter)?;
    let b = lab.add_router("b", NatKind::HomeRouter)?;
    let c = lab.add_router("c", NatKind::HomeRouter)?;
    // a far from b only: 2 × (20 + 150 + 20) = 380 ms to b, still 80 ms to c.
    lab.set_wan_far(&a, &[&b as &dyn Site], Duration::from_millis(150))?;
    // Both at once, every 50 ms: b's frames wait in a's far ring while c's pass.
    let (far, near) = std::thread::scope(|s| {
        let far = s.spawn(|| ping(&a, &b, 20, "0.05"));
        let near = ping(&a, &c, 20, "0.05");
        (far.join(), near)
    });
    let (far, _) = far.map_err(|_| anyhow!("ping thread panicked"))??;
    let (near, _) = near?;
    println!("wan: a far from b (+150 ms): RTT to b {far:?} ms, to c meanwhile {near:?} ms");
    ensure!(far.min >= 370.0, "RTT {far:?} ms to the far address");
    ensure!(
        near.avg < 150.0 && near.max < 300.0,
        "RTT {near:?} ms to a near address while far frames were held: head-of-line blocking"
    );
    lab.set_wan_far(&a, &[], Duration::ZERO)?;
    let (back, _) = ping(&a, &b, 3, "0.2")?;
    println!("wan: far setting cleared: RTT to b {back:?} ms");
    ensure!(back.max < 300.0, "RTT {back:?} ms after clearing");
    Ok(())
}

/// A lab with one router of a kind, a host behind it, two STUN servers, a peer the host
/// contacts and a stranger it does not (all four public).
struct NatLab {
    // Declared first, dropped first: the handles below only name the lab's namespaces.
    lab: Lab,
    router: Router,
    inside: Host,
    servers: [StunServer; 2],
    peer: Host,
    stranger: Host,
}

/// Which datagrams sent to the filtering probe's mapped address reached it.
struct Heard {
    from_contacted_peer: bool,
    from_peer_other_port: bool,
    from_stranger: bool,
}

impl NatLab {
    fn new(kind: NatKind) -> Result<NatLab> {
        let lab = Lab::new()?;
        let stun1 = lab.add_host("stun1")?;
        let stun2 = lab.add_host("stun2")?;
        let peer = lab.add_host("peer")?;
        let stranger = lab.add_host("stranger")?;
        let router = lab.add_router("home", kind)?;
        let inside = lab.add_host_behind(&router, "inside")?;
        let servers = [StunServer::start(&stun1)?, StunServer::start(&stun2)?];
        Ok(NatLab {
            lab,
            router,
            inside,
            servers,
            peer,
            stranger,
        })
    }

    fn server_addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(StunServer::addr).collect()
    }

    /// Both servers' answers to binding requests from one socket on `port`.
    fn probe(&self, port: u16) -> Result<Vec<ProbeResult>> {
        let events = stun::run_probe(&self.inside, &ProbeOptions::new(&self.server_addrs(), port))?;
        events
            .into_iter()
            .find_map(|e| match e {
                stun::ProbeEvent::Mapped { results, .. } => Some(results),
                _ => None,
            })
            .ok_or_else(|| anyhow!("the probe reported no mapping"))
    }

    /// The two mapped addresses seen from one socket on `port`; both servers must answer.
    fn mapped_from_one_socket(&self, port: u16) -> Result<[SocketAddr; 2]> {
        let results = self.probe(port)?;
        let mapped: Vec<SocketAddr> = results.iter().filter_map(|r| r.mapped).collect();
        ensure!(mapped.len() == 2, "not every server answered: {results:?}");
        Ok([mapped[0], mapped[1]])
    }

    /// From a fresh socket: a binding request to the first server, a hello to the peer; then
    /// the peer (from the port it was greeted on, and another), and the stranger send to the
    /// mapped address.
    fn unsolicited_and_replies(&self) -> Result<Heard> {
        let peer = SocketAddr::from((self.peer.ip(), PEER_PORT));
        let mut opts = ProbeOptions::new(&self.server_addrs()[..1], FILTERING_PORT);
        opts.hello = vec![peer];
        opts.listen = LISTEN;
        let probe = RunningProbe::start(&self.inside, &opts)?;
        let mapped = probe.wait_mapped()?[0]
            .mapped
            .ok_or_else(|| anyhow!("no STUN answer for the filtering probe"))?;
        stun::udp_send(&self.peer, PEER_PORT, mapped, "from-peer", 3)?;
        stun::udp_send(&self.peer, PEER_PORT + 1, mapped, "from-peer-other-port", 3)?;
        stun::udp_send(&self.stranger, PEER_PORT, mapped, "from-stranger", 3)?;
        let received = probe.wait_done()?;
        let heard = |payload: &str| received.iter().any(|(_, p)| p == payload);
        Ok(Heard {
            from_contacted_peer: heard("from-peer"),
            from_peer_other_port: heard("from-peer-other-port"),
            from_stranger: heard("from-stranger"),
        })
    }
}

/// Prints one calibration line.
fn report(kind: NatKind, nat: &NatLab, mapped: [SocketAddr; 2], heard: &Heard, started: Instant) {
    println!(
        "calibration {kind}: inside {}:{MAPPING_PORT} → {} and {}; peer reply {}, peer other \
         port {}, stranger {} ({:.1} s)",
        nat.inside.ip(),
        mapped[0],
        mapped[1],
        yes_no(heard.from_contacted_peer),
        yes_no(heard.from_peer_other_port),
        yes_no(heard.from_stranger),
        started.elapsed().as_secs_f64()
    );
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "in"
    } else {
        "dropped"
    }
}

/// `count` pings from router `from`'s namespace to `to`'s WAN address, `interval` seconds apart.
/// Fails unless at least one is answered; returns the RTT statistics and the counts.
fn ping(from: &Router, to: &Router, count: u32, interval: &str) -> Result<(RttStats, PingSummary)> {
    let target = to.wan_ip().to_string();
    let count_s = count.to_string();
    let out = from.host().run_timeout(
        &[
            "ping", "-q", "-c", &count_s, "-i", interval, "-W", "2", &target,
        ],
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = parse_summary(&text).ok_or_else(|| anyhow!("no ping summary: {text}"))?;
    let rtt = parse_rtt_stats(&text).ok_or_else(|| anyhow!("no RTT line: {text}"))?;
    Ok((rtt, summary))
}
