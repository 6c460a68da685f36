//! The NAT matrix: every pair of {public, full cone, home router, symmetric, carrier NAT}, plus
//! two peers behind one home router, with a control plane and two relays on the public side and
//! the default WAN (20 ms one way per uplink). Each cell joins a party, pings over the overlay
//! and records the route (direct / relay), the time to the first reply and the time until the
//! direct path carries traffic. It asserts only that every cell connects and takes the expected
//! route; the times are reported (printed and written to `nat-matrix.md` in the cargo target
//! temp dir).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rally_lab::scenario::World;
use rally_lab::{punchable, with_lab, Agent, ControlPlane, Host, Lab, NatKind};

/// How long a cell may take to answer its first ping.
const FIRST_REPLY: Duration = Duration::from_secs(30);
/// How long a cell expected to go direct may take to get there: two birthday attempts (one
/// misses by chance 1.7 % of the time, and the next follows 6 s after it ends).
const DIRECT: Duration = Duration::from_secs(40);
/// How long a relayed cell is watched to see that it stays on the relay.
const STAYS_RELAYED: Duration = Duration::from_secs(6);
/// Cells run this many at a time (two slow cores).
const PARALLEL: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Site {
    Public,
    Nat(NatKind),
}

impl Site {
    fn label(self) -> &'static str {
        match self {
            Site::Public => "public",
            Site::Nat(NatKind::FullCone) => "full cone",
            Site::Nat(NatKind::HomeRouter) => "home router",
            Site::Nat(NatKind::Symmetric) => "symmetric",
            Site::Nat(NatKind::Cgnat) => "carrier NAT",
            Site::Nat(k) => k.label(),
        }
    }

    /// The NAT in front of the site; `None` for a public address.
    fn nat(self) -> Option<NatKind> {
        match self {
            Site::Public => None,
            Site::Nat(kind) => Some(kind),
        }
    }
}

const SITES: [Site; 5] = [
    Site::Public,
    Site::Nat(NatKind::FullCone),
    Site::Nat(NatKind::HomeRouter),
    Site::Nat(NatKind::Symmetric),
    Site::Nat(NatKind::Cgnat),
];

#[derive(Clone, Copy, Debug)]
enum Pair {
    Sites(Site, Site),
    SameLan,
}

impl Pair {
    fn label(self) -> String {
        match self {
            Pair::Sites(a, b) => format!("{} ↔ {}", a.label(), b.label()),
            Pair::SameLan => "same home router (LAN)".into(),
        }
    }

    /// Direct wherever the two NATs allow a punch ([`punchable`]), relay otherwise.
    fn expect_direct(self) -> bool {
        match self {
            Pair::SameLan => true,
            Pair::Sites(a, b) => punchable(a.nat(), b.nat()),
        }
    }
}

impl Pair {
    /// The `relay_reason` a relayed cell must end with: decided from both NAT types.
    fn expected_relay_reason(self) -> &'static str {
        let Pair::Sites(a, b) = self else {
            return "punch-timed-out";
        };
        let (a, b) = (a.nat(), b.nat());
        if [a, b].contains(&Some(NatKind::UdpBlocked)) {
            "udp-blocked"
        } else if [a, b]
            .iter()
            .all(|s| s.is_some_and(NatKind::maps_endpoint_dependently))
        {
            "both-symmetric"
        } else {
            "punch-timed-out"
        }
    }
}

/// How long a relayed cell may take to settle on its relay reason (a punch runs 10 s).
const REASON: Duration = Duration::from_secs(20);

struct Outcome {
    pair: Pair,
    route: String,
    /// The `relay_reason` a relayed cell settled on.
    relay_reason: Option<String>,
    first_reply: Duration,
    direct_after: Option<Duration>,
}

#[test]
fn nat_matrix_connects_every_pair_on_the_expected_route() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let cp = &world.cp;

        let mut pairs = Vec::new();
        for (i, a) in SITES.iter().enumerate() {
            for b in &SITES[i..] {
                pairs.push(Pair::Sites(*a, *b));
            }
        }
        pairs.push(Pair::SameLan);

        let mut outcomes: Vec<Result<Outcome>> = Vec::new();
        for (chunk_no, chunk) in pairs.chunks(PARALLEL).enumerate() {
            let results: Vec<Result<Outcome>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, pair)| {
                        let cell = chunk_no * PARALLEL + i;
                        let cp = &cp;
                        s.spawn(move || run_cell(lab, cp, cell, *pair))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("cell panicked"))))
                    .collect()
            });
            outcomes.extend(results);
        }

        let table = render(&pairs, &outcomes);
        println!("{table}");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nat-matrix.md");
        std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());

        let mut failures = Vec::new();
        for (pair, outcome) in pairs.iter().zip(&outcomes) {
            match outcome {
                Err(e) => failures.push(format!("{}: {e:#}", pair.label())),
                Ok(o) => {
                    let want = if pair.expect_direct() {
                        "direct"
                    } else {
                        "relay"
                    };
                    if !o.route.starts_with(want) {
                        failures.push(format!(
                            "{}: took {} where {want} was expected",
                            pair.label(),
                            o.route
                        ));
                    }
                    let reason = pair.expected_relay_reason();
                    if !pair.expect_direct() && o.relay_reason.as_deref() != Some(reason) {
                        failures.push(format!(
                            "{}: relay_reason {:?} where {reason} was expected",
                            pair.label(),
                            o.relay_reason
                        ));
                    }
                }
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} of {} cells failed:\n{}",
                failures.len(),
                pairs.len(),
                failures.join("\n")
            );
        }
        Ok(())
    })
}

/// The host for one side of a cell: a public host, or a host behind a fresh router.
fn place(lab: &Lab, site: Site, name: &str) -> Result<Host> {
    match site {
        Site::Public => lab.add_wan_host(name),
        Site::Nat(kind) => {
            let router = lab.add_router(&format!("{name}-gw"), kind)?;
            lab.add_host_behind(&router, name)
        }
    }
}

fn run_cell(lab: &Lab, cp: &ControlPlane, cell: usize, pair: Pair) -> Result<Outcome> {
    let (a_name, b_name) = (format!("c{cell}a"), format!("c{cell}b"));
    let (a_host, b_host) = match pair {
        Pair::Sites(a, b) => (place(lab, a, &a_name)?, place(lab, b, &b_name)?),
        Pair::SameLan => {
            let router = lab.add_router(&format!("c{cell}-gw"), NatKind::HomeRouter)?;
            (
                lab.add_host_behind(&router, &a_name)?,
                lab.add_host_behind(&router, &b_name)?,
            )
        }
    };
    let a = Agent::start(&a_host, &a_name, cp.control())?;
    let b = Agent::start(&b_host, &b_name, cp.control())?;
    for agent in [&a, &b] {
        agent.wait_control_connected(Duration::from_secs(20))?;
        // Netcheck finished on both sides before the party forms.
        rally_lab::scenario::wait_netcheck(agent, Duration::from_secs(20))?;
    }
    let code = a.party_create(&format!("cell{cell}"), &[])?;

    let start = Instant::now();
    let out = b.party_join(&code)?;
    if !out.status.success() {
        bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let b_vip = b.virtual_ip()?.to_string();
    let first_reply = loop {
        let out = a.kernel_ping(&b_vip, 1)?;
        if out.status.success() {
            break start.elapsed();
        }
        if start.elapsed() > FIRST_REPLY {
            bail!("no ping reply within {FIRST_REPLY:?}");
        }
    };

    let deadline = start
        + if pair.expect_direct() {
            DIRECT
        } else {
            FIRST_REPLY.min(first_reply + STAYS_RELAYED)
        };
    let mut direct_after = None;
    let mut route;
    loop {
        route = route_to(&a, &b_name)?;
        if route == "direct" && direct_after.is_none() {
            direct_after = Some(start.elapsed());
        }
        if Instant::now() >= deadline || (direct_after.is_some() && pair.expect_direct()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A relayed cell says why, once its punch has run out.
    let mut relay_reason = None;
    if route.starts_with("relay") {
        let until = Instant::now() + REASON;
        let want = pair.expected_relay_reason();
        loop {
            relay_reason = peer_row(&a, &b_name)?["relay_reason"]
                .as_str()
                .map(str::to_owned);
            if relay_reason.as_deref() == Some(want) || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // `rally peer why` says the same, with both sides' NAT findings.
        let why = a.rally_ok(&["peer", "why", &b_name])?;
        for line in [
            format!("relayed:     {want}"),
            "the peer:    mapping".into(),
        ] {
            if !why.contains(&line) {
                bail!("`rally peer why {b_name}` lacks {line:?}:\n{why}");
            }
        }
    }
    // Both ways, on whatever path they settled on.
    let a_vip = a.virtual_ip()?.to_string();
    for (from, to) in [(&a, &b_vip), (&b, &a_vip)] {
        let out = from.kernel_ping(to, 3)?;
        if !out.status.success() {
            bail!("{} cannot ping {to} after settling on {route}", from.name());
        }
    }
    Ok(Outcome {
        pair,
        route,
        relay_reason,
        first_reply,
        direct_after,
    })
}

/// Agent `a`'s `rally peers --json` row for peer `name`.
fn peer_row(a: &Agent, name: &str) -> Result<serde_json::Value> {
    let peers = a.peers_json()?;
    peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("{} does not list {name}", a.name()))
}

/// `direct` or `relay:NAME`, as agent `a` sees its path to peer `name`.
fn route_to(a: &Agent, name: &str) -> Result<String> {
    let peer = peer_row(a, name)?;
    Ok(match peer["strategy"].as_str() {
        Some("relay") => format!("relay:{}", peer["relay"].as_str().unwrap_or("?")),
        Some(s) => s.to_owned(),
        None => "none".into(),
    })
}

fn render(pairs: &[Pair], outcomes: &[Result<Outcome>]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| pair | expected | route | first reply | direct after |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    for (pair, o) in pairs.iter().zip(outcomes) {
        let expected = if pair.expect_direct() {
            "direct"
        } else {
            "relay"
        };
        match o {
            Ok(o) => {
                let _ = writeln!(
                    t,
                    "| {} | {expected} | {} | {} | {} |",
                    o.pair.label(),
                    match &o.relay_reason {
                        Some(r) => format!("{} ({r})", o.route),
                        None => o.route.clone(),
                    },
                    ms(o.first_reply),
                    o.direct_after.map_or("-".into(), ms)
                );
            }
            Err(e) => {
                let _ = writeln!(t, "| {} | {expected} | FAILED: {e} | - | - |", pair.label());
            }
        }
    }
    let ok: Vec<&Outcome> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let home_pair = ok.iter().find(|o| {
        matches!(
            o.pair,
            Pair::Sites(
                Site::Nat(NatKind::HomeRouter),
                Site::Nat(NatKind::HomeRouter)
            )
        )
    });
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied()
    };
    let first = median(ok.iter().map(|o| o.first_reply).collect());
    let direct = median(ok.iter().filter_map(|o| o.direct_after).collect());
    let _ = writeln!(
        t,
        "\nmedian first reply {} · median time to direct {} · home-router pair: first reply {}, direct after {}",
        first.map_or("-".into(), ms),
        direct.map_or("-".into(), ms),
        home_pair.map_or("-".into(), |o| ms(o.first_reply)),
        home_pair.and_then(|o| o.direct_after).map_or("-".into(), ms),
    );
    t
}
