//! The netcheck over the simulated network: the real relay core (two relays, each with an
//! alternate port) and NAT models of every kind; the side socket's mapping decides filtering.

use std::time::Duration;

use rally_proto::control::NatBehavior::{self, *};

use super::sim::{NatKind, Sim};
use super::{NatCause, NodeEvent};

#[test]
fn netcheck_decides_mapping_and_filtering_behind_every_nat() {
    let cases: [(NatKind, NatBehavior, NatBehavior); 5] = [
        (NatKind::Public, EndpointIndependent, EndpointIndependent),
        (NatKind::FullCone, EndpointIndependent, EndpointIndependent),
        (NatKind::Restricted, EndpointIndependent, AddressDependent),
        (NatKind::Home, EndpointIndependent, AddressAndPortDependent),
        (
            NatKind::Symmetric,
            AddressAndPortDependent,
            AddressAndPortDependent,
        ),
    ];
    for (kind, mapping, filtering) in cases {
        let t0 = std::time::Instant::now();
        let mut sim = Sim::new(t0);
        sim.add_relay("r1");
        sim.add_relay("r2");
        let a = sim.add_agent(kind);
        sim.start();
        let done = sim.run_until(t0 + Duration::from_secs(5), |s| report(s, a).is_some());
        assert!(done, "{kind:?}: no netcheck report");
        let (m, f) = report(&sim, a).unwrap();
        assert_eq!((m, f), (mapping, filtering), "{kind:?}");
    }
}

fn report(sim: &Sim, a: usize) -> Option<(NatBehavior, NatBehavior)> {
    sim.agents[a].events.iter().find_map(|(_, ev)| match ev {
        NodeEvent::Nat {
            report,
            cause: NatCause::Netcheck,
        } => Some((report.mapping, report.filtering)),
        _ => None,
    })
}
