//! Relay choice by the pair's own quality: every relayed path is probed end to end (through
//! the relay to the peer and back), so its RTT and loss are the pair's, not this agent's
//! distance to the relay; their jitter (the median change between consecutive samples) and loss
//! count too ([`JITTER_WEIGHT`], `LOSS_WEIGHT`). A relayed primary that is not slow enough for the
//! `relay_switch_latency` rule still moves, make-before-break (the other relay's path is up
//! and probed already), to a relay whose quality is at least [`BETTER_BY`] better
//! continuously for [`BETTER_FOR`]; a measurement in between that is not clearly better starts
//! the clock again, and after a switch the old relay must earn it the same way: no flapping.

use super::*;

/// How much better (lower) another relay's quality must be: 10 %.
pub const BETTER_BY: f64 = 0.10;
/// For how long, without a break.
pub const BETTER_FOR: Duration = Duration::from_secs(10);
/// The weight of loss in a path's quality: each 1 % of probes lost counts as 4 % more RTT.
const LOSS_WEIGHT: f64 = 4.0;
/// The weight of jitter in a path's quality: the RTT plus twice its jitter (the median
/// difference between consecutive RTT samples, `Health::jitter`), about what a receiver's
/// jitter buffer must wait for late packets (so 60 ms with 15 ms jitter ranks with 90 ms
/// steady).
pub const JITTER_WEIGHT: f64 = 2.0;

impl Connection {
    /// The relay clearly better for the pair than `current` for [`BETTER_FOR`], if one is.
    pub(super) fn clearly_better_relay(
        &mut self,
        current: &PathId,
        now: Instant,
    ) -> Option<PathId> {
        if current.kind() != PathKind::Relay {
            self.better = None;
            return None;
        }
        let Some(ours) = self.paths.get(current).and_then(quality) else {
            self.better = None;
            return None;
        };
        let best = self
            .paths
            .iter()
            .filter(|(id, p)| {
                id.kind() == PathKind::Relay
                    && *id != current
                    && p.health.is_trusted(&self.profile)
                    && p.held_until.is_none_or(|t| now >= t)
            })
            .filter_map(|(id, p)| Some((quality(p)?, id)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((q, id)) if q <= ours * (1.0 - BETTER_BY) => match &self.better {
                Some((p, since)) if p == id => {
                    if now.saturating_duration_since(*since) >= BETTER_FOR {
                        return Some(id.clone());
                    }
                }
                _ => self.better = Some((id.clone(), now)),
            },
            _ => self.better = None,
        }
        None
    }
}

/// A path's quality for the pair in ms (lower is better): its smoothed RTT plus
/// [`JITTER_WEIGHT`] × its jitter, raised by its loss rate ([`LOSS_WEIGHT`]).
pub(super) fn quality(p: &Path) -> Option<f64> {
    let rtt = p.health.rtt?.as_secs_f64() * 1000.0;
    let jitter = p.health.jitter().unwrap_or_default().as_secs_f64() * 1000.0;
    let loss = if p.health.probes_sent == 0 {
        0.0
    } else {
        p.health.probes_failed as f64 / p.health.probes_sent as f64
    };
    Some((rtt + JITTER_WEIGHT * jitter) * (1.0 + LOSS_WEIGHT * loss))
}
