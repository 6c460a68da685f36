//! The agent's Prometheus endpoint (`rally up --metrics ADDR:PORT`).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rally_proto::http::{head_complete, label_value, metrics_response, write_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::api::PeerStatus;

/// Renders per-peer metrics, labelled by peer, path type and relay.
pub fn render(peers: &[PeerStatus]) -> String {
    let labels = |p: &PeerStatus| {
        format!(
            "peer=\"{}\",virtual_ip=\"{}\",path=\"{}\",relay=\"{}\"",
            label_value(&p.name),
            p.virtual_ip,
            p.strategy,
            label_value(p.relay.as_deref().unwrap_or(""))
        )
    };
    let series = |f: &dyn Fn(&PeerStatus) -> Option<f64>| -> Vec<(String, f64)> {
        peers
            .iter()
            .filter_map(|p| f(p).map(|v| (labels(p), v)))
            .collect()
    };
    let mut out = String::with_capacity(256 + peers.len() * 512);
    write_metric(
        &mut out,
        "rally_peers",
        "gauge",
        "Peers in the peer map.",
        &[(String::new(), peers.len() as f64)],
    );
    write_metric(
        &mut out,
        "rally_peer_latency_ms",
        "gauge",
        "Smoothed round-trip time of the primary path.",
        &series(&|p| p.latency_ms),
    );
    write_metric(
        &mut out,
        "rally_peer_bytes_sent_total",
        "counter",
        "Bytes sent to the peer through the tunnel.",
        &series(&|p| Some(p.bytes_sent as f64)),
    );
    write_metric(
        &mut out,
        "rally_peer_bytes_received_total",
        "counter",
        "Bytes received from the peer through the tunnel.",
        &series(&|p| Some(p.bytes_received as f64)),
    );
    write_metric(
        &mut out,
        "rally_peer_failovers_total",
        "counter",
        "Failovers from a failed primary path.",
        &series(&|p| Some(p.failovers as f64)),
    );
    write_metric(
        &mut out,
        "rally_peer_relay_switches_total",
        "counter",
        "Switches between relays on latency.",
        &series(&|p| Some(p.relay_switches as f64)),
    );
    write_metric(
        &mut out,
        "rally_peer_queue_dropped_total",
        "counter",
        "Packets dropped from the queue while no path was up.",
        &series(&|p| Some(p.queue_dropped as f64)),
    );
    let states: Vec<(String, f64)> = peers
        .iter()
        .map(|p| (format!("{},state=\"{}\"", labels(p), p.state), 1.0))
        .collect();
    write_metric(
        &mut out,
        "rally_peer_state",
        "gauge",
        "The peer's connection state (1 for the current one).",
        &states,
    );
    render_dataplane(&mut out);
    out
}

/// Appends the data plane's own counters: drops by the security checks, the relay-over-TCP
/// queues, the flow queues and the data-plane thread.
fn render_dataplane(out: &mut String) {
    crate::dataplane::security::COUNTERS.render(out);
    render_relay_tcp(out);
    crate::dataplane::queue_metrics::render(out);
}

/// Appends the relay-over-TCP counters.
fn render_relay_tcp(out: &mut String) {
    let drops = crate::dataplane::relay_tcp::QUEUE_DROPS.load(std::sync::atomic::Ordering::Relaxed);
    write_metric(
        out,
        "rally_dataplane_relay_tcp_drops_total",
        "counter",
        "Frames dropped, oldest first, from full send queues of relay connections over TLS/TCP.",
        &[(String::new(), drops as f64)],
    );
}

/// Appends discovery's counters.
pub fn render_discovery(out: &mut String, c: &rally_agent_core::discovery::Counters) {
    let one = |v: u64| [(String::new(), v as f64)];
    write_metric(
        out,
        "rally_discovery_forwarded_total",
        "counter",
        "Local broadcasts and multicasts forwarded to the party.",
        &one(c.forwarded),
    );
    write_metric(
        out,
        "rally_discovery_copies_sent_total",
        "counter",
        "Encrypted copies of them sent to peers.",
        &one(c.copies_sent),
    );
    write_metric(
        out,
        "rally_discovery_delivered_total",
        "counter",
        "Broadcasts and multicasts from peers delivered here.",
        &one(c.delivered),
    );
    let drops = [
        ("capped", c.dropped_capped),
        ("duplicate", c.dropped_duplicate),
        ("disabled", c.dropped_disabled),
        ("unsubscribed", c.dropped_unsubscribed),
        ("malformed", c.dropped_malformed),
        ("looped", c.dropped_foreign),
    ]
    .map(|(why, v)| (format!("reason=\"{why}\""), v as f64));
    write_metric(
        out,
        "rally_discovery_dropped_total",
        "counter",
        "Discovery packets dropped, by reason.",
        &drops,
    );
}

/// Serves `GET /metrics` on `listener`, rendering each answer from `snapshot()`.
pub async fn serve<F, Fut>(listener: TcpListener, snapshot: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let answer = async {
                let mut head = Vec::with_capacity(512);
                let mut chunk = [0u8; 512];
                while !head_complete(&head) {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                let body = snapshot().await;
                stream
                    .write_all(&metrics_response(&head, || Some(body)))
                    .await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
        });
    }
}

/// Binds the metrics listener, or says why not.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_peer_series() {
        let p = PeerStatus {
            peer_id: "id".into(),
            name: "bob".into(),
            virtual_ip: "10.66.1.2".parse().unwrap(),
            strategy: crate::api::Strategy::Relay,
            relay: Some("r1".into()),
            endpoint: None,
            state: crate::api::PeerState::Connected,
            latency_ms: Some(12.5),
            bytes_sent: 10,
            bytes_received: 20,
            uptime_seconds: 0,
            is_primary: true,
            priority: 1,
            connected_at: None,
            parties: vec![],
            candidates: vec![],
            direct_since_ms: None,
            failovers: 2,
            relay_switches: 0,
            queued: 0,
            queue_dropped: 0,
            paths: vec![],
            relay_reason: None,
            peer_nat: None,
            path: None,
            birthday: None,
            techniques: Vec::new(),
        };
        let text = render(&[p]);
        assert!(text.contains("rally_peer_latency_ms{peer=\"bob\",virtual_ip=\"10.66.1.2\",path=\"relay\",relay=\"r1\"} 12.5"));
        assert!(text.contains("rally_peer_failovers_total{peer=\"bob\",virtual_ip=\"10.66.1.2\",path=\"relay\",relay=\"r1\"} 2"));
        assert!(text.contains("state=\"connected\"} 1"));
        assert!(text.contains("rally_peers 1"));
        assert!(text.contains("rally_dataplane_relay_tcp_drops_total "));
    }
}
