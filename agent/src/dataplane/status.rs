//! `rally peers`: one [`PeerStatus`] row per peer, from the node's view and the tunnel's
//! counters.

use std::time::{SystemTime, UNIX_EPOCH};

use rally_proto::Key32;

use super::engine::{Engine, Peer, PeerStatus};
use super::timers::route_kind;
use crate::api::PeerState as Row;
use crate::conn::ConnState;
use crate::node::PeerState;

impl Engine {
    pub(super) fn status(&self) -> Vec<PeerStatus> {
        let mut rows: Vec<PeerStatus> = self
            .node
            .peers()
            .filter_map(|(id, p)| Some(self.peer_status(id, p, self.peers.get(id)?)))
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
        rows
    }

    fn peer_status(&self, id: &Key32, p: &PeerState, tunnel: &Peer) -> PeerStatus {
        let stats = tunnel.tunnel.stats();
        let m = p.conn().metrics();
        let route = self.node.route(id);
        let relay = p
            .conn()
            .primary()
            .and_then(|path| path.relay())
            .map(str::to_string);
        let primary = m.paths.iter().find(|x| x.is_primary);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok();
        let info = p.info();
        PeerStatus {
            peer_id: id.to_string(),
            name: info.name.clone(),
            virtual_ip: info.virtual_ip,
            strategy: route_kind(route),
            relay: relay.filter(|_| route.is_some()),
            endpoint: route.map(|r| r.addr()),
            state: peer_state(p.conn().state()),
            latency_ms: m.latency_ms.or(stats.rtt_ms.map(f64::from)),
            bytes_sent: stats.tx_bytes as u64,
            bytes_received: stats.rx_bytes as u64,
            uptime_seconds: tunnel
                .connected_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0, |d| d.as_secs()),
            is_primary: primary.is_some(),
            priority: primary.map_or(0, |x| x.priority),
            connected_at: tunnel.connected_at.and_then(unix).map(|d| d.as_secs()),
            parties: info.parties.clone(),
            candidates: p.candidates().to_vec(),
            direct_since_ms: tunnel
                .direct_since
                .and_then(unix)
                .map(|d| d.as_millis() as u64),
            failovers: m.failovers,
            relay_switches: m.relay_switches,
            queued: m.queued,
            queue_dropped: m.queue_dropped,
            paths: m.paths,
            relay_reason: self
                .node
                .relay_reason(id)
                .filter(|_| route.is_some())
                .map(|r| r.as_str().to_string()),
            peer_nat: info.nat.clone(),
            path: p
                .conn()
                .primary()
                .filter(|_| route.is_some())
                .map(ToString::to_string),
            birthday: birthday_status(p.birthday(), super::timers::now()),
            techniques: super::techniques::techniques(
                p,
                self.node.nat(),
                route,
                super::timers::now(),
            ),
        }
    }
}

/// The last birthday-punching attempt of a peer's machine, for `rally peers`.
fn birthday_status(
    b: &rally_agent_core::birthday::Birthday,
    now: std::time::Instant,
) -> Option<crate::api::BirthdayStatus> {
    use rally_agent_core::birthday::{Outcome, Role};
    let r = b.record()?;
    Some(crate::api::BirthdayStatus {
        role: match r.role {
            Role::Open { .. } => "open",
            Role::Probe { .. } => "probe",
        }
        .into(),
        outcome: match r.outcome {
            Outcome::Running => "running",
            Outcome::Direct { .. } => "direct",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
        .into(),
        probes: r.probes,
        predicted: r.predicted,
        sockets: r.sockets,
        bytes: r.bytes,
        started_ms_ago: now.saturating_duration_since(r.started).as_millis() as u64,
        took_ms: r
            .ended
            .map(|e| e.saturating_duration_since(r.started).as_millis() as u64),
        failures: b.failures(),
    })
}

/// The connection manager's state as `rally peers` spells it.
fn peer_state(state: ConnState) -> Row {
    match state {
        ConnState::Connecting => Row::Connecting,
        ConnState::Connected => Row::Connected,
        ConnState::Degraded => Row::Degraded,
        ConnState::Reconnecting => Row::Reconnecting,
        ConnState::Failed => Row::Failed,
        ConnState::Disconnected => Row::Disconnected,
    }
}
