//! Prometheus text exposition (format 0.0.4) of the relay's [`Stats`].

use std::fmt::Write;

use crate::core::Stats;

/// Renders every metric, drop reasons included even when zero:
///
/// `rally_relay_sessions_active` (gauge), `rally_relay_sessions_total`,
/// `rally_relay_sessions_refused_total`, `rally_relay_packets_forwarded_total`,
/// `rally_relay_bytes_forwarded_total`, `rally_relay_stun_requests_total` and
/// `rally_relay_drops_total{reason="…"}` (counters).
pub fn render(stats: &Stats) -> String {
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "rally_relay_sessions_active",
        "gauge",
        "Sessions bound now.",
        stats.sessions_active,
    );
    metric(
        "rally_relay_sessions_total",
        "counter",
        "Sessions bound since start (rebinds included).",
        stats.sessions_total,
    );
    metric(
        "rally_relay_sessions_refused_total",
        "counter",
        "Bind attempts refused.",
        stats.sessions_refused,
    );
    metric(
        "rally_relay_packets_forwarded_total",
        "counter",
        "Packets forwarded between agents.",
        stats.packets_forwarded,
    );
    metric(
        "rally_relay_bytes_forwarded_total",
        "counter",
        "Bytes forwarded between agents.",
        stats.bytes_forwarded,
    );
    metric(
        "rally_relay_stun_requests_total",
        "counter",
        "STUN binding requests answered.",
        stats.stun_requests,
    );
    let _ = writeln!(
        out,
        "# HELP rally_relay_drops_total Datagrams not forwarded or answered, by reason."
    );
    let _ = writeln!(out, "# TYPE rally_relay_drops_total counter");
    for (reason, n) in stats.drops_by_reason() {
        let _ = writeln!(
            out,
            "rally_relay_drops_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::DropReason;

    #[test]
    fn every_metric_and_every_drop_reason_is_exposed() {
        let text = render(&Stats::default());
        for name in [
            "rally_relay_sessions_active 0",
            "rally_relay_sessions_total 0",
            "rally_relay_sessions_refused_total 0",
            "rally_relay_packets_forwarded_total 0",
            "rally_relay_bytes_forwarded_total 0",
            "rally_relay_stun_requests_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == name),
                "missing {name:?} in\n{text}"
            );
        }
        for r in DropReason::ALL {
            let line = format!("rally_relay_drops_total{{reason=\"{}\"}} 0", r.as_str());
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
    }
}
