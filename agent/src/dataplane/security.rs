//! The data plane's security counters, published for the metrics endpoint: what the handshake
//! guard, the destination filter and the relay clients refused. The data-plane thread stores
//! them when they are read — every metrics scrape first asks the engine for the peers
//! ([`EngineCmd::Peers`](super::EngineCmd::Peers)), and the engine publishes before it answers —
//! so a scrape sees every datagram handled before it, and an idle agent wakes for none of this.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rally_proto::http::write_metric;

use super::engine::Engine;
use super::handshake_guard::GuardStats;

impl Engine {
    /// Stores the current totals in [`COUNTERS`].
    pub(super) fn publish_security(&self) {
        COUNTERS.publish(
            self.guard.stats(),
            self.inbound.dropped(),
            self.node.relay_unauthenticated(),
        );
    }
}

/// The counters of this process's data plane.
pub static COUNTERS: Counters = Counters::new();

pub struct Counters {
    handshakes_passed: AtomicU64,
    bad_mac1: AtomicU64,
    cookie_replies: AtomicU64,
    under_load: AtomicU64,
    source_budget: AtomicU64,
    global_budget: AtomicU64,
    destination: AtomicU64,
    relay_unauthenticated: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Counters {
            handshakes_passed: AtomicU64::new(0),
            bad_mac1: AtomicU64::new(0),
            cookie_replies: AtomicU64::new(0),
            under_load: AtomicU64::new(0),
            source_budget: AtomicU64::new(0),
            global_budget: AtomicU64::new(0),
            destination: AtomicU64::new(0),
            relay_unauthenticated: AtomicU64::new(0),
        }
    }

    /// Stores the data plane's current totals.
    pub fn publish(&self, guard: GuardStats, destination: u64, relay_unauthenticated: u64) {
        self.handshakes_passed.store(guard.passed, Relaxed);
        self.bad_mac1.store(guard.bad_mac1, Relaxed);
        self.cookie_replies.store(guard.cookie_replies, Relaxed);
        self.under_load.store(guard.under_load, Relaxed);
        self.source_budget.store(guard.source_budget, Relaxed);
        self.global_budget.store(guard.global_budget, Relaxed);
        self.destination.store(destination, Relaxed);
        self.relay_unauthenticated
            .store(relay_unauthenticated, Relaxed);
    }

    /// Appends the counters as Prometheus text.
    pub fn render(&self, out: &mut String) {
        let v = |c: &AtomicU64| c.load(Relaxed) as f64;
        write_metric(
            out,
            "rally_handshakes_total",
            "counter",
            "WireGuard handshake messages let through to the Diffie-Hellman.",
            &[(String::new(), v(&self.handshakes_passed))],
        );
        write_metric(
            out,
            "rally_cookie_replies_total",
            "counter",
            "Cookie replies sent to handshakes under load.",
            &[(String::new(), v(&self.cookie_replies))],
        );
        let drops = [
            ("handshake_bad_mac1", &self.bad_mac1),
            ("handshake_under_load", &self.under_load),
            ("handshake_source_budget", &self.source_budget),
            ("handshake_global_budget", &self.global_budget),
            ("destination_not_ours", &self.destination),
            ("relay_unauthenticated", &self.relay_unauthenticated),
        ];
        write_metric(
            out,
            "rally_dataplane_drops_total",
            "counter",
            "Datagrams and packets the data plane refused, by reason.",
            &drops
                .iter()
                .map(|(r, c)| (format!("reason=\"{r}\""), v(c)))
                .collect::<Vec<_>>(),
        );
    }
}
