//! Queries on a connection: state, paths, and the metrics snapshot (`ConnMetrics`).

use super::*;

/// A snapshot for `rally peers` and Prometheus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnMetrics {
    pub state: ConnState,
    pub primary: Option<PathId>,
    /// `direct` or `relay`, from the primary.
    pub strategy: Option<PathKind>,
    /// The primary's smoothed latency.
    pub latency_ms: Option<f64>,
    pub failovers: u64,
    pub relay_switches: u64,
    /// The current reconnect attempt (0 when not reconnecting).
    pub reconnect_attempt: u32,
    pub queued: usize,
    pub queue_dropped: u64,
    /// Every path, in priority order.
    pub paths: Vec<PathMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathMetrics {
    pub path: PathId,
    pub kind: PathKind,
    pub health: PathHealth,
    pub latency_ms: Option<f64>,
    pub is_primary: bool,
    /// Position in the priority order; 0 is the most preferred.
    pub priority: u32,
    /// Pinned with `set_primary`.
    pub pinned: bool,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub probes_sent: u64,
    pub probes_failed: u64,
}

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
