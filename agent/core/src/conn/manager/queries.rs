//! Queries on a connection: state, paths, metrics.

use super::*;

impl Connection {
    // ----- queries -----

    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The path traffic goes on now.
    pub fn primary(&self) -> Option<&PathId> {
        self.primary.as_ref()
    }

    /// The path pinned with `set_primary`, while the pin holds.
    pub fn pinned(&self) -> Option<&PathId> {
        self.pinned.as_ref()
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Since when the current primary-holding stretch began (for `uptime_seconds`).
    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_since
    }

    pub fn path_health(&self, path: &PathId) -> Option<PathHealth> {
        self.paths.get(path).map(|p| p.health.state)
    }

    /// A path's smoothed latency, once measured.
    pub fn latency(&self, path: &PathId) -> Option<Duration> {
        self.paths.get(path).and_then(|p| p.health.rtt)
    }

    /// Every known path, in priority order.
    pub fn paths(&self) -> Vec<&PathId> {
        self.ranked().into_iter().map(|r| r.path).collect()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn metrics(&self) -> ConnMetrics {
        let ms = |d: Duration| d.as_nanos() as f64 / 1e6;
        let paths = self
            .ranked()
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let p = self.paths.get(r.path)?;
                Some(PathMetrics {
                    path: r.path.clone(),
                    kind: r.kind,
                    health: p.health.state,
                    latency_ms: p.health.rtt.map(ms),
                    is_primary: self.primary.as_ref() == Some(r.path),
                    priority: u32::try_from(i).unwrap_or(u32::MAX),
                    pinned: self.pinned.as_ref() == Some(r.path),
                    consecutive_failures: p.health.failures,
                    consecutive_successes: p.health.successes,
                    probes_sent: p.health.probes_sent,
                    probes_failed: p.health.probes_failed,
                })
            })
            .collect();
        ConnMetrics {
            state: self.state,
            primary: self.primary.clone(),
            strategy: self.primary.as_ref().map(PathId::kind),
            latency_ms: self.primary.as_ref().and_then(|p| self.latency(p)).map(ms),
            failovers: self.failovers,
            relay_switches: self.relay_switches,
            reconnect_attempt: self.attempt,
            queued: self.queue.len(),
            queue_dropped: self.queue.dropped(),
            paths,
        }
    }
}
