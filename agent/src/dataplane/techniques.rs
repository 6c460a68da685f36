//! `rally peer why`'s technique history: each way to a direct path (LAN, punch, port mapping,
//! prediction, birthday) with its result, from the node's view of one peer.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use rally_agent_core::birthday::{Outcome, Role};
use rally_proto::control::NatReport;

use crate::api::TechniqueStatus;
use crate::node::{PeerState, Route};

fn row(technique: &str, result: &str, detail: String) -> TechniqueStatus {
    TechniqueStatus {
        technique: technique.into(),
        result: result.into(),
        detail,
    }
}

fn private(a: &SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn secs(from: Instant, to: Instant) -> String {
    format!("{:.1} s", to.saturating_duration_since(from).as_secs_f64())
}

/// Every technique towards `p`, in the order they apply.
pub(super) fn techniques(
    p: &PeerState,
    mine: Option<&NatReport>,
    route: Option<Route>,
    now: Instant,
) -> Vec<TechniqueStatus> {
    let facts = PunchFacts::new(p, route, now);
    let by_birthday = birthday_direct(p, facts.direct);
    // Port mapping: either side's gateway mapping.
    let mapped = p
        .info()
        .nat
        .as_ref()
        .and_then(|n| n.mapped_endpoint)
        .or(mine.and_then(|n| n.mapped_endpoint));
    let via_mapping = mapped.is_some_and(|m| facts.direct == Some(SocketAddr::V4(m)));
    let mut out = vec![
        lan_row(p, &facts),
        punch_row(p, &facts, via_mapping, by_birthday),
        port_mapping_row(&facts, mapped, via_mapping),
    ];
    out.extend(birthday_rows(p, now));
    out
}

/// What the LAN, punch and port-mapping rows share: the direct path and the punch history.
struct PunchFacts {
    direct: Option<SocketAddr>,
    started: Option<Instant>,
    /// ` 1.2 s after the punch started` once a punch proved the path, else empty.
    took: String,
    punching: bool,
    failed: usize,
    now: Instant,
}

impl PunchFacts {
    fn new(p: &PeerState, route: Option<Route>, now: Instant) -> PunchFacts {
        let direct = match route {
            Some(Route::Direct(a)) => Some(a),
            _ => None,
        };
        let (started, proven) = p.punch_history();
        let took = match (started, proven) {
            (Some(s), Some(d)) if d >= s => format!(" {} after the punch started", secs(s, d)),
            _ => String::new(),
        };
        PunchFacts {
            direct,
            started,
            took,
            punching: p.is_punching(),
            failed: p.punches_failed(),
            now,
        }
    }

    /// `, 3.0 s ago` since the last punch started, or empty.
    fn ago(&self) -> String {
        self.started
            .map_or(String::new(), |t| format!(", {} ago", secs(t, self.now)))
    }

    /// Result and detail of a technique that has not (yet) given the direct path.
    fn pending(&self, what: &str) -> (&'static str, String) {
        if self.punching {
            ("running", format!("{what}: punching now{}", self.ago()))
        } else if self.failed > 0 {
            (
                "failed",
                format!("{what}: {} punch(es) timed out{}", self.failed, self.ago()),
            )
        } else if self.started.is_some() {
            (
                "failed",
                format!("{what}: probed, no answer; another way won"),
            )
        } else {
            ("not-tried", format!("{what}: no punch yet"))
        }
    }
}

/// The direct address birthday punching found (either side's view).
fn birthday_direct(p: &PeerState, direct: Option<SocketAddr>) -> Option<SocketAddr> {
    p.birthday().record().and_then(|r| {
        let won = matches!(r.outcome, Outcome::Direct { .. });
        let ip = match r.role {
            Role::Open { target } => target.ip(),
            Role::Probe { ip, .. } => ip,
        };
        direct.filter(|a| won && a.ip() == ip)
    })
}

/// LAN: the peer's private candidates.
fn lan_row(p: &PeerState, f: &PunchFacts) -> TechniqueStatus {
    let lan: Vec<&SocketAddr> = p.candidates().iter().filter(|a| private(a)).collect();
    match f.direct {
        Some(a) if private(&a) => row("lan", "direct", format!("{a}{}", f.took)),
        _ if lan.is_empty() => row("lan", "not-tried", "the peer lists no LAN address".into()),
        _ => {
            let (r, d) = f.pending(&format!("{} LAN address(es)", lan.len()));
            row("lan", r, d)
        }
    }
}

/// Punch on public endpoints.
fn punch_row(
    p: &PeerState,
    f: &PunchFacts,
    via_mapping: bool,
    by_birthday: Option<SocketAddr>,
) -> TechniqueStatus {
    match f.direct {
        Some(a) if !private(&a) && !via_mapping && by_birthday != Some(a) => {
            row("punch", "direct", format!("{a}{}", f.took))
        }
        _ if p.is_hopeless() => row(
            "punch",
            "skipped",
            "both sides map endpoint-dependently and neither holds a port mapping".into(),
        ),
        _ => {
            let (r, d) = f.pending("public endpoints");
            row("punch", r, d)
        }
    }
}

/// Port mapping: either side's gateway mapping (`mapped`).
fn port_mapping_row(
    f: &PunchFacts,
    mapped: Option<SocketAddrV4>,
    via_mapping: bool,
) -> TechniqueStatus {
    match mapped {
        Some(m) if via_mapping => row("port-mapping", "direct", format!("{m}{}", f.took)),
        Some(m) => {
            let (r, d) = f.pending(&format!("mapped endpoint {m}"));
            row("port-mapping", r, d)
        }
        None => row(
            "port-mapping",
            "not-tried",
            "neither side holds a gateway port mapping (PCP, NAT-PMP, UPnP)".into(),
        ),
    }
}

/// Prediction and birthday, from the last birthday attempt.
fn birthday_rows(p: &PeerState, now: Instant) -> Vec<TechniqueStatus> {
    let Some(r) = p.birthday().record() else {
        let why = "not needed for this pair (it applies when one side is symmetric and the \
                   other filters by address and port)";
        return vec![
            row("prediction", "not-tried", why.into()),
            row("birthday", "not-tried", why.into()),
        ];
    };
    let result = |o: Outcome| match o {
        Outcome::Running => "running",
        Outcome::Direct { .. } => "direct",
        Outcome::Failed => "failed",
        Outcome::Abandoned => "skipped",
    };
    let when = match r.ended {
        Some(e) => format!("ran {} ({} ago)", secs(r.started, e), secs(e, now)),
        None => format!("running for {}", secs(r.started, now)),
    };
    let prediction = match r.role {
        Role::Probe {
            predict: Some((base, d)),
            ..
        } => {
            let hit = matches!(r.outcome, Outcome::Direct { predicted: true });
            row(
                "prediction",
                if hit { "direct" } else { result(r.outcome) },
                format!(
                    "{} port(s) after {base} in steps of {d} probed{}",
                    r.predicted,
                    if hit { ", one answered" } else { "" }
                ),
            )
        }
        Role::Probe { predict: None, .. } => row(
            "prediction",
            "skipped",
            "the peer's NAT allocates ports at random".into(),
        ),
        Role::Open { .. } => row(
            "prediction",
            "skipped",
            "the peer predicts our ports (this side opens sockets)".into(),
        ),
    };
    let what = match r.role {
        Role::Open { target } => format!("opened {} sockets towards {target}", r.sockets),
        Role::Probe { ip, .. } => format!("probed {} ports of {ip} (budget 1024)", r.probes),
    };
    let birthday = row(
        "birthday",
        result(r.outcome),
        format!("{what}, {} bytes; {when}", r.bytes),
    );
    vec![prediction, birthday]
}
