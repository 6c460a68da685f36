//! Why a peer is relayed: decided from both sides' NAT reports, the pin and the punch history.

use rally_proto::control::NatReport;
use rally_proto::Key32;

use super::Node;

/// The reason a peer's primary path is a relay (`relay_reason` in `rally peers --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayReason {
    /// The user pinned the relay path (`rally peer pin`).
    Pinned,
    /// One side found no UDP to the outside at all.
    UdpBlocked,
    /// Both sides map endpoint-dependently and neither holds a gateway port mapping.
    BothSymmetric,
    /// Punching runs now; the relay carries traffic meanwhile.
    Punching,
    /// Every punch attempt so far timed out without a proven direct path.
    PunchTimedOut,
    /// Birthday punching (one side symmetric) ran its budget without a direct path.
    BirthdayFailed,
    /// One side has not reported its NAT yet, and no punch has finished.
    NatUnknown,
}

impl RelayReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayReason::Pinned => "pinned",
            RelayReason::UdpBlocked => "udp-blocked",
            RelayReason::BothSymmetric => "both-symmetric",
            RelayReason::Punching => "punching",
            RelayReason::PunchTimedOut => "punch-timed-out",
            RelayReason::BirthdayFailed => "birthday-failed",
            RelayReason::NatUnknown => "nat-unknown",
        }
    }
}

/// What the pair looks like, as far as the reason goes.
pub(super) struct PairFacts<'a> {
    pub mine: Option<&'a NatReport>,
    pub theirs: Option<&'a NatReport>,
    pub pinned: bool,
    pub punching: bool,
    pub punches_failed: usize,
    /// Birthday attempts in a row that failed.
    pub birthdays_failed: usize,
    /// A birthday attempt runs now.
    pub birthday_running: bool,
}

/// The first reason that holds, strongest first.
pub(super) fn decide(f: &PairFacts<'_>) -> RelayReason {
    if f.pinned {
        return RelayReason::Pinned;
    }
    if f.mine.is_some_and(|n| !n.udp) || f.theirs.is_some_and(|n| !n.udp) {
        return RelayReason::UdpBlocked;
    }
    let hard = |n: Option<&NatReport>| {
        n.is_some_and(|n| n.mapping.is_endpoint_dependent() && n.mapped_endpoint.is_none())
    };
    if hard(f.mine) && hard(f.theirs) {
        return RelayReason::BothSymmetric;
    }
    if f.birthday_running {
        return RelayReason::Punching;
    }
    if f.birthdays_failed > 0 {
        return RelayReason::BirthdayFailed;
    }
    if f.punches_failed > 0 {
        return RelayReason::PunchTimedOut;
    }
    if f.punching {
        return RelayReason::Punching;
    }
    if f.mine.is_none() || f.theirs.is_none() {
        return RelayReason::NatUnknown;
    }
    RelayReason::PunchTimedOut
}

impl Node {
    /// Why `id` is relayed, when its primary path is a relay; `None` otherwise.
    pub fn relay_reason(&self, id: &Key32) -> Option<RelayReason> {
        let p = self.peers.get(id)?;
        let primary = p.conn.primary()?;
        if !primary.kind().is_relay() {
            return None;
        }
        Some(decide(&PairFacts {
            mine: self.nat.as_ref(),
            theirs: p.info.nat.as_ref(),
            pinned: p.conn.pinned() == Some(primary),
            punching: p.paths.is_punching(),
            punches_failed: p.paths.punches_failed(),
            birthdays_failed: p.birthday.failures(),
            birthday_running: p.birthday.is_running(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rally_proto::control::NatBehavior;

    use super::super::sim::{NatKind, Sim};
    use super::super::Route;
    use super::*;

    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn origin() -> Instant {
        Instant::now()
    }

    fn pair(a: NatKind, b: NatKind) -> (Sim, Instant) {
        let t0 = origin();
        let mut sim = Sim::new(t0);
        sim.add_relay("r1");
        sim.add_relay("r2");
        sim.add_agent(a);
        sim.add_agent(b);
        sim.start();
        (sim, t0)
    }

    fn reason(sim: &Sim, a: usize, b: usize) -> Option<RelayReason> {
        sim.agents[a].node.relay_reason(&sim.id(b))
    }

    #[test]
    fn a_symmetric_pair_is_relayed_because_both_are_symmetric() {
        let (mut sim, t0) = pair(NatKind::Symmetric, NatKind::Symmetric);
        // Punching while the NAT reports are on their way; both-symmetric once they are in.
        let decided = sim.run_until(t0 + Duration::from_secs(10), |s| {
            reason(s, 0, 1) == Some(RelayReason::BothSymmetric)
                && reason(s, 1, 0) == Some(RelayReason::BothSymmetric)
        });
        assert!(
            decided,
            "{:?} / {:?}",
            reason(&sim, 0, 1),
            reason(&sim, 1, 0)
        );
        assert!(matches!(sim.route(0, 1), Some(Route::Relay { .. })));
        assert_eq!(reason(&sim, 0, 1), Some(RelayReason::BothSymmetric));
        assert_eq!(reason(&sim, 1, 0), Some(RelayReason::BothSymmetric));
    }

    #[test]
    fn a_home_router_to_a_symmetric_nat_is_relayed_after_birthday_punching_failed() {
        let (mut sim, t0) = pair(NatKind::Home, NatKind::Symmetric);
        // No direct way at all between the two (relays still reach both): the punch times
        // out, then birthday punching runs out of its budget too.
        let (a, b) = (sim.public_ip(0), sim.public_ip(1));
        sim.cuts.push((a, b));
        let failed = sim.run_until(t0 + Duration::from_secs(60), |s| {
            reason(s, 0, 1) == Some(RelayReason::BirthdayFailed)
                && reason(s, 1, 0) == Some(RelayReason::BirthdayFailed)
        });
        assert!(
            failed,
            "{:?} / {:?}",
            reason(&sim, 0, 1),
            reason(&sim, 1, 0)
        );
        assert!(matches!(sim.route(0, 1), Some(Route::Relay { .. })));
    }

    #[test]
    fn a_direct_pair_has_no_relay_reason() {
        let (mut sim, t0) = pair(NatKind::Home, NatKind::FullCone);
        let direct = sim.run_until(t0 + Duration::from_secs(10), |s| {
            matches!(s.route(0, 1), Some(Route::Direct(_)))
        });
        assert!(direct);
        assert_eq!(reason(&sim, 0, 1), None);
    }

    fn report(mapping: NatBehavior, udp: bool) -> NatReport {
        NatReport {
            udp,
            mapping,
            filtering: NatBehavior::AddressAndPortDependent,
            ..NatReport::default()
        }
    }

    #[test]
    fn the_strongest_reason_wins() {
        let sym = report(NatBehavior::AddressAndPortDependent, true);
        let home = report(NatBehavior::EndpointIndependent, true);
        let blocked = report(NatBehavior::Unknown, false);
        let facts = |mine, theirs, pinned, punching, punches_failed| PairFacts {
            mine,
            theirs,
            pinned,
            punching,
            punches_failed,
            birthdays_failed: 0,
            birthday_running: false,
        };
        let d = |f: PairFacts<'_>| decide(&f);
        assert_eq!(
            decide(&PairFacts {
                birthdays_failed: 1,
                ..facts(Some(&home), Some(&sym), false, true, 3)
            }),
            RelayReason::BirthdayFailed
        );
        assert_eq!(
            decide(&PairFacts {
                birthday_running: true,
                birthdays_failed: 1,
                ..facts(Some(&home), Some(&sym), false, false, 3)
            }),
            RelayReason::Punching
        );
        assert_eq!(
            d(facts(Some(&sym), Some(&sym), true, false, 0)),
            RelayReason::Pinned
        );
        assert_eq!(
            d(facts(Some(&home), Some(&blocked), false, false, 3)),
            RelayReason::UdpBlocked
        );
        assert_eq!(
            d(facts(Some(&sym), Some(&sym), false, false, 2)),
            RelayReason::BothSymmetric
        );
        assert_eq!(
            d(facts(Some(&home), Some(&sym), false, true, 1)),
            RelayReason::PunchTimedOut
        );
        assert_eq!(
            d(facts(Some(&home), Some(&sym), false, true, 0)),
            RelayReason::Punching
        );
        assert_eq!(
            d(facts(Some(&home), None, false, false, 0)),
            RelayReason::NatUnknown
        );
        // A side with a gateway mapping is not symmetric for punching.
        let mut mapped = sym.clone();
        mapped.mapped_endpoint = Some("198.51.100.9:51820".parse().unwrap());
        assert_eq!(
            d(facts(Some(&sym), Some(&mapped), false, false, 1)),
            RelayReason::PunchTimedOut
        );
    }
}
