//! Prometheus text exposition (format 0.0.4) of the relay's [`Stats`] and its sockets' kernel
//! drops.

use std::sync::atomic::{AtomicU64, Ordering};

use rally_proto::http::write_metric;

use crate::core::Stats;
use crate::tcp::TcpCounters;

/// What the metrics endpoint shows: the core's counters and the driver's view of its sockets.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The relay core's counters.
    pub stats: Stats,
    /// Per socket (`"primary"`, `"alt"`), datagrams the kernel dropped on its receive queue.
    pub socket_drops: Vec<(&'static str, u64)>,
    /// Whether the forwarding thread holds its real-time class (bulk traffic flows).
    pub realtime: bool,
}

/// Renders every metric, drop reasons included even when zero:
///
/// `rally_relay_sessions_active` (gauge), `rally_relay_sessions_total`,
/// `rally_relay_sessions_refused_total`, `rally_relay_packets_forwarded_total`,
/// `rally_relay_bytes_forwarded_total`, `rally_relay_stun_requests_total` and
/// `rally_relay_drops_total{reason="…"}` (counters); and for each socket in `socket_drops`
/// (`"primary"`, `"alt"`), `rally_relay_socket_drops_total{socket="…"}`: datagrams the kernel
/// dropped before the relay could read them (receive buffer full), which the relay's own drop
/// counts never see.
///
/// With `--listen-tcp` (`tcp` given), per transport: `rally_relay_tcp_sessions_active`,
/// `rally_relay_tcp_packets_forwarded_total` (to or from a TCP session),
/// `rally_relay_tcp_connections_active`, `rally_relay_tcp_connections_total`,
/// `rally_relay_tcp_connections_refused_total` and `rally_relay_tcp_queue_drops_total`
/// (frames dropped from a slow reader's full queue).
///
/// `rally_relay_forwarder_realtime` (gauge): 1 while the forwarding thread holds its real-time
/// class.
pub fn render(snapshot: &Snapshot, tcp: Option<&TcpCounters>) -> String {
    let (stats, socket_drops) = (&snapshot.stats, &snapshot.socket_drops);
    let mut out = String::with_capacity(2048);
    let mut scalars = core_scalars(stats);
    scalars.push((
        "rally_relay_forwarder_realtime",
        "gauge",
        "1 while the forwarding thread holds its real-time class (bulk traffic flows).",
        u64::from(snapshot.realtime),
    ));
    if let Some(tcp) = tcp {
        scalars.extend(tcp_scalars(stats, tcp));
    }
    for (name, kind, help, value) in scalars {
        write_metric(&mut out, name, kind, help, &[(String::new(), value as f64)]);
    }
    let drops: Vec<(String, f64)> = stats
        .drops_by_reason()
        .map(|(reason, n)| (format!("reason=\"{}\"", reason.as_str()), n as f64))
        .collect();
    write_metric(
        &mut out,
        "rally_relay_drops_total",
        "counter",
        DROPS_HELP,
        &drops,
    );
    if !socket_drops.is_empty() {
        let samples: Vec<(String, f64)> = socket_drops
            .iter()
            .map(|(socket, n)| (format!("socket=\"{socket}\""), *n as f64))
            .collect();
        write_metric(
            &mut out,
            "rally_relay_socket_drops_total",
            "counter",
            SOCKET_DROPS_HELP,
            &samples,
        );
    }
    out
}

const DROPS_HELP: &str = "Datagrams not forwarded or answered, by reason.";
const SOCKET_DROPS_HELP: &str =
    "Datagrams the kernel dropped on the relay's socket before it read them (receive buffer full).";

/// One unlabelled sample: name, type, help, value.
type Scalar = (&'static str, &'static str, &'static str, u64);

fn core_scalars(stats: &Stats) -> Vec<Scalar> {
    vec![
        (
            "rally_relay_sessions_active",
            "gauge",
            "Sessions bound now.",
            stats.sessions_active,
        ),
        (
            "rally_relay_sessions_total",
            "counter",
            "Sessions bound since start (rebinds included).",
            stats.sessions_total,
        ),
        (
            "rally_relay_sessions_refused_total",
            "counter",
            "Bind attempts refused.",
            stats.sessions_refused,
        ),
        (
            "rally_relay_packets_forwarded_total",
            "counter",
            "Packets forwarded between agents.",
            stats.packets_forwarded,
        ),
        (
            "rally_relay_bytes_forwarded_total",
            "counter",
            "Bytes forwarded between agents.",
            stats.bytes_forwarded,
        ),
        (
            "rally_relay_stun_requests_total",
            "counter",
            "STUN binding requests answered.",
            stats.stun_requests,
        ),
    ]
}

fn tcp_scalars(stats: &Stats, tcp: &TcpCounters) -> Vec<Scalar> {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    vec![
        (
            "rally_relay_tcp_sessions_active",
            "gauge",
            "Sessions bound over TLS/TCP now.",
            stats.sessions_active_tcp,
        ),
        (
            "rally_relay_tcp_packets_forwarded_total",
            "counter",
            "Packets forwarded to or from a session over TLS/TCP.",
            stats.packets_forwarded_tcp,
        ),
        (
            "rally_relay_tcp_connections_active",
            "gauge",
            "TCP connections open now.",
            n(&tcp.connections_active),
        ),
        (
            "rally_relay_tcp_connections_total",
            "counter",
            "TCP connections accepted since start.",
            n(&tcp.connections_total),
        ),
        (
            "rally_relay_tcp_connections_refused_total",
            "counter",
            "TCP connections closed at once for a connection cap.",
            n(&tcp.connections_refused),
        ),
        (
            "rally_relay_tcp_queue_drops_total",
            "counter",
            "Frames dropped (oldest first) from a TCP client's full queue: a slow reader.",
            n(&tcp.queue_drops),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::DropReason;

    #[test]
    fn every_metric_and_every_drop_reason_is_exposed() {
        let snapshot = Snapshot {
            socket_drops: vec![("primary", 3)],
            ..Snapshot::default()
        };
        let text = render(&snapshot, Some(&TcpCounters::default()));
        for name in [
            "rally_relay_sessions_active 0",
            "rally_relay_sessions_total 0",
            "rally_relay_sessions_refused_total 0",
            "rally_relay_packets_forwarded_total 0",
            "rally_relay_bytes_forwarded_total 0",
            "rally_relay_stun_requests_total 0",
            "rally_relay_tcp_sessions_active 0",
            "rally_relay_tcp_queue_drops_total 0",
            "rally_relay_forwarder_realtime 0",
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
        assert!(text
            .lines()
            .any(|l| l == "rally_relay_socket_drops_total{socket=\"primary\"} 3"));
    }
}
