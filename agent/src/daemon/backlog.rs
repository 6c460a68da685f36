//! What the control plane must hear from the data plane, kept while it is away: this agent's
//! latest NAT report and the peers the data plane wants punched. Nothing the engine says is
//! dropped for want of a control connection; it goes out on the next registration. The NAT
//! report carries the gateway port mapping's external endpoint, whichever of the two changes.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;

use rally_proto::control::NatReport;
use rally_proto::{Key32, Request};

use crate::dataplane::EngineEvent;

/// Punch requests kept while the control plane is away (one per peer; more are dropped).
pub(super) const MAX_PENDING_PUNCHES: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Backlog {
    nat: Option<NatReport>,
    punches: BTreeSet<Key32>,
    /// The external endpoint of the gateway port mapping, if any.
    mapped: Option<SocketAddrV4>,
}

impl Backlog {
    /// A data-plane event: the requests to send now if the control plane is `connected`;
    /// otherwise it is kept (the latest NAT report, each wanted punch once).
    pub(super) fn handle_engine_event(&mut self, ev: EngineEvent, connected: bool) -> Vec<Request> {
        match ev {
            EngineEvent::Nat(mut nat) => {
                nat.mapped_endpoint = self.mapped;
                self.nat = Some(nat.clone());
                if connected {
                    vec![Request::ReportNat { nat }]
                } else {
                    Vec::new()
                }
            }
            EngineEvent::WantPunch(peer) if connected => vec![Request::Punch { peer }],
            EngineEvent::WantPunch(peer) => {
                if self.punches.len() < MAX_PENDING_PUNCHES {
                    self.punches.insert(peer);
                }
                Vec::new()
            }
        }
    }

    /// The gateway port mapping appeared, changed or went: the NAT report carries it from now
    /// on, and goes out again at once if the control plane is `connected` (and there is one).
    pub(super) fn handle_mapped_endpoint(
        &mut self,
        mapped: Option<SocketAddrV4>,
        connected: bool,
    ) -> Vec<Request> {
        self.mapped = mapped;
        let Some(nat) = self.nat.as_mut() else {
            return Vec::new();
        };
        if nat.mapped_endpoint == mapped {
            return Vec::new();
        }
        nat.mapped_endpoint = mapped;
        if connected {
            vec![Request::ReportNat { nat: nat.clone() }]
        } else {
            Vec::new()
        }
    }

    /// After a registration: the latest NAT report (every time: a new session of the control
    /// plane may not have it) and the punches wanted meanwhile.
    pub(super) fn on_registered(&mut self) -> Vec<Request> {
        let nat = self.nat.clone().map(|nat| Request::ReportNat { nat });
        let punches = std::mem::take(&mut self.punches)
            .into_iter()
            .map(|peer| Request::Punch { peer });
        nat.into_iter().chain(punches).collect()
    }

    /// This agent's latest NAT report.
    pub(super) fn nat(&self) -> Option<&NatReport> {
        self.nat.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(port: u16) -> NatReport {
        NatReport {
            udp: true,
            public_endpoint: Some(([203, 0, 113, 7], port).into()),
            ..NatReport::default()
        }
    }

    #[test]
    fn a_nat_report_made_while_away_is_sent_on_registration() {
        let mut b = Backlog::default();
        assert!(b
            .handle_engine_event(EngineEvent::Nat(report(1)), false)
            .is_empty());
        assert!(b
            .handle_engine_event(EngineEvent::Nat(report(2)), false)
            .is_empty());
        assert_eq!(b.on_registered(), [Request::ReportNat { nat: report(2) }]);
        // Every later registration hears it again.
        assert_eq!(b.on_registered(), [Request::ReportNat { nat: report(2) }]);
        assert_eq!(b.nat(), Some(&report(2)));
    }

    #[test]
    fn while_connected_everything_goes_out_at_once() {
        let mut b = Backlog::default();
        let out = b.handle_engine_event(EngineEvent::Nat(report(1)), true);
        assert_eq!(out, [Request::ReportNat { nat: report(1) }]);
        let peer = Key32([3; 32]);
        let out = b.handle_engine_event(EngineEvent::WantPunch(peer), true);
        assert_eq!(out, [Request::Punch { peer }]);
        assert_eq!(b.on_registered(), [Request::ReportNat { nat: report(1) }]);
    }

    #[test]
    fn punches_wanted_while_away_go_out_once_each_on_registration() {
        let mut b = Backlog::default();
        let (p, q) = (Key32([1; 32]), Key32([2; 32]));
        for peer in [q, p, q] {
            assert!(b
                .handle_engine_event(EngineEvent::WantPunch(peer), false)
                .is_empty());
        }
        assert_eq!(
            b.on_registered(),
            [Request::Punch { peer: p }, Request::Punch { peer: q }]
        );
        assert!(b.on_registered().is_empty());
    }

    #[test]
    fn the_nat_report_carries_the_port_mapping_whichever_comes_first() {
        let mapped: SocketAddrV4 = "198.51.100.7:51820".parse().unwrap();
        let with = |port| NatReport {
            mapped_endpoint: Some(mapped),
            port_delta: None,
            ..report(port)
        };
        // The mapping before any report: nothing to send; the first report carries it.
        let mut b = Backlog::default();
        assert!(b.handle_mapped_endpoint(Some(mapped), true).is_empty());
        let out = b.handle_engine_event(EngineEvent::Nat(report(1)), true);
        assert_eq!(out, [Request::ReportNat { nat: with(1) }]);
        // The same mapping again changes nothing.
        assert!(b.handle_mapped_endpoint(Some(mapped), true).is_empty());

        // A report, then the mapping: the report goes out again with it.
        let mut b = Backlog::default();
        b.handle_engine_event(EngineEvent::Nat(report(2)), true);
        let out = b.handle_mapped_endpoint(Some(mapped), true);
        assert_eq!(out, [Request::ReportNat { nat: with(2) }]);
        // The mapping goes while the control plane is away: kept for the registration.
        assert!(b.handle_mapped_endpoint(None, false).is_empty());
        assert_eq!(b.on_registered(), [Request::ReportNat { nat: report(2) }]);
    }

    #[test]
    fn kept_punches_are_bounded() {
        let mut b = Backlog::default();
        for i in 0..MAX_PENDING_PUNCHES + 10 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            b.handle_engine_event(EngineEvent::WantPunch(Key32(key)), false);
        }
        assert_eq!(b.on_registered().len(), MAX_PENDING_PUNCHES);
    }
}
