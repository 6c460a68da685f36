//! The hub's counters and their Prometheus text.

use std::collections::BTreeMap;

use rally_proto::http::write_metric;

use super::{Hub, JOIN_REFUSALS};
use crate::store::Store;

/// Counts since start.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub registrations: u64,
    pub registrations_refused: u64,
    pub joins_refused: BTreeMap<&'static str, u64>,
    pub full_frames: u64,
    pub deltas: u64,
    pub too_large: u64,
    pub punches_limited: u64,
    pub expired: u64,
}

/// What only the driver counts (connections and its queues).
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverFigures {
    pub connections: u64,
    pub connections_refused: u64,
    pub retries: u64,
    pub deliveries_dropped: u64,
}

impl Hub {
    /// Prometheus text: agents connected, agents and parties stored, registrations, refusals by
    /// reason, pushes, and the driver's figures.
    pub fn render_metrics(&self, driver: DriverFigures) -> String {
        let c = &self.counters;
        let (agents, parties) = self.store.counts().unwrap_or((0, 0));
        let one = |v: f64| vec![(String::new(), v)];
        let mut out = String::new();
        let mut gauge = |name: &str, kind: &str, help: &str, v: f64| {
            write_metric(&mut out, name, kind, help, &one(v));
        };
        gauge(
            "rally_control_agents_connected",
            "gauge",
            "Agents with a live session.",
            self.connected_agents() as f64,
        );
        gauge(
            "rally_control_agents",
            "gauge",
            "Agents registered.",
            agents as f64,
        );
        gauge("rally_control_parties", "gauge", "Parties.", parties as f64);
        gauge(
            "rally_control_registrations_total",
            "counter",
            "Successful registrations since start.",
            c.registrations as f64,
        );
        gauge(
            "rally_control_registrations_refused_total",
            "counter",
            "Registrations refused (WireGuard key in use, too many new agents from one address).",
            c.registrations_refused as f64,
        );
        gauge(
            "rally_control_messages_too_large_total",
            "counter",
            "Agent messages refused for a size or count over its bound.",
            c.too_large as f64,
        );
        gauge(
            "rally_control_punches_limited_total",
            "counter",
            "Punch requests refused by the per-agent rate limit.",
            c.punches_limited as f64,
        );
        gauge(
            "rally_control_unjoined_expired_total",
            "counter",
            "Identities removed for never joining a party.",
            c.expired as f64,
        );
        render_driver(&mut out, driver);
        self.render_labelled(&mut out);
        out
    }

    /// Join refusals by reason and pushes by kind.
    fn render_labelled(&self, out: &mut String) {
        let c = &self.counters;
        let by_reason: Vec<(String, f64)> = JOIN_REFUSALS
            .iter()
            .map(|code| {
                let n = c.joins_refused.get(code.as_str()).copied().unwrap_or(0);
                (format!("reason=\"{}\"", code.as_str()), n as f64)
            })
            .collect();
        write_metric(
            out,
            "rally_control_joins_refused_total",
            "counter",
            "Join attempts refused, by reason.",
            &by_reason,
        );
        write_metric(
            out,
            "rally_control_peer_pushes_total",
            "counter",
            "Peer-map frames pushed, by kind (full map or one of its pages, or delta).",
            &[
                ("kind=\"full\"".to_string(), c.full_frames as f64),
                ("kind=\"delta\"".to_string(), c.deltas as f64),
            ],
        );
    }
}

/// The driver's connection and queue figures.
fn render_driver(out: &mut String, driver: DriverFigures) {
    let mut gauge = |name: &str, kind: &str, help: &str, v: f64| {
        write_metric(out, name, kind, help, &[(String::new(), v)]);
    };
    gauge(
        "rally_control_connections",
        "gauge",
        "QUIC connections open.",
        driver.connections as f64,
    );
    gauge(
        "rally_control_connections_refused_total",
        "counter",
        "Connection attempts refused by the total or per-address cap.",
        driver.connections_refused as f64,
    );
    gauge(
        "rally_control_retries_total",
        "counter",
        "Connection attempts answered with a QUIC Retry (address validation under load).",
        driver.retries as f64,
    );
    gauge(
        "rally_control_deliveries_dropped_total",
        "counter",
        "Messages for another session dropped because its queue was full.",
        driver.deliveries_dropped as f64,
    );
}
