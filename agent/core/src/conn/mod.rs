//! The connection manager: one [`Connection`] per peer, a sans-IO state machine that keeps
//! several paths to the peer warm, picks the primary, fails over, reconnects and queues.
//!
//! Nothing here reads a clock, owns a socket or draws thread randomness: time is the `now`
//! argument of every input, randomness the `seed` given to [`Connection::new`]. The engine
//! drives it (see "Driving a connection" below); tests drive it with a fake clock.
//!
//! # Paths, priority and health
//!
//! A peer is reachable by [`PathId::Direct`] (a punched or LAN endpoint) and by
//! [`PathId::Relay`] (one per relay this agent is bound to). Every live path is probed, so a
//! standby is ready the moment the primary fails. Paths are ordered by [`Rank`], a derived
//! `Ord`: direct before relay, then lower smoothed RTT (EWMA, new sample weighs ¼), unmeasured
//! last; `priority` 0 is the most preferred.
//!
//! A probe succeeds when acknowledged within `max_latency`; it fails when acknowledged later
//! or not within `probe_timeout`. A path is **up** after one successful probe and **down**
//! after `failure_threshold` failures in a row, so one lost probe never demotes the primary.
//! Authenticated data on a path (`handle_rx`) resets its failure count: traffic is liveness.
//!
//! **Silence checks** make a busy peer fail over fast: when data was sent on the primary
//! (`handle_tx`) and nothing — no data, no probe ack — has come back on it for
//! `silence_timeout` (or two smoothed RTTs, if longer), [`CHECK_PROBES`] probes go out
//! [`CHECK_SPACING`] apart. Any answer or data ends the check; none within three smoothed RTTs
//! plus [`CHECK_MARGIN`] (at least [`CHECK_MIN_WAIT`], at most `max_latency`) takes the path
//! down at once. One lost probe never fails a check; idle peers are never checked.
//!
//! * **Failover**: the primary goes down or is removed → the best up path takes over
//!   (`Failover` + `PrimaryChange`).
//! * **Recovery**: a direct path takes the role back from a relay as soon as it is up if it
//!   never failed, else only after `recovery_threshold` successful probes in a row — under
//!   alternating loss it never gets there, so the primary does not flap.
//! * **Relay switching**: a relayed primary whose EWMA exceeds `relay_switch_latency` (200 ms)
//!   moves to the fastest other relay measured strictly faster (`RelaySwitch`). After
//!   [`RELAY_TRIAL_SAMPLES`] acknowledged probes on the new relay, if their mean (plus
//!   [`JITTER_WEIGHT`] × the new relay's jitter) is above the old relay's quality (EWMA plus
//!   the same for its jitter, raised by its loss), it switches back
//!   (`RelaySwitch { revert: true }`) and holds the new relay out of switching for
//!   [`RELAY_REVERT_HOLD`]. A relayed primary also moves to a relay ≥ [`BETTER_BY`] better
//!   for the pair (RTT, jitter, loss) for [`BETTER_FOR`] (`relay_choice`).
//! * **Manual**: [`Connection::set_primary`] pins an up path until it goes down or is
//!   removed; while pinned, recovery and relay switching are off.
//!
//! Probing cadence: every `probe_interval` while the peer is busy (data sent or received in
//! the last `idle_after`) or has no primary; every `idle_probe_interval` while idle (and
//! after `failed`). While idle only the primary keeps that interval; standbys are probed
//! [`IDLE_STANDBY_FACTOR`] times as rarely, and a probe due takes along the peer's other
//! probes due within `idle_probe_interval / `[`IDLE_COALESCE`], so an idle peer costs one
//! wake-up per round, not one per path. An idle up path the peer itself just probed
//! (`handle_peer_probe`) is not probed by us that round: each idle path is watched by one
//! side. Data arriving on an up path pulls its next probe to at most one
//! `probe_interval` later, so when a busy path goes silent a probe follows within one
//! interval and its loss counts.
//!
//! # States
//!
//! ```text
//!                    first path up                   primary EWMA > degraded_latency
//!   +------------+ ----------------> +-----------+ --------------------------------> +----------+
//!   | connecting |                   | connected |                                   | degraded |
//!   +------------+        +--------> +-----------+ <-------------------------------- +----------+
//!         |               | path up        |          primary EWMA <= degraded_latency    |
//!         | connect_      |                | last usable path lost                         |
//!         | timeout,      |                v                                               |
//!         | no path       |         +--------------+ <-------------------------------------+
//!         +-------------->|-------> | reconnecting |   attempt 1 now, attempt n+1 after
//!                         |         +--------------+   min(max, base*2^(n-1)) * (1 +- jitter)
//!                         |                | wait after the last attempt ran out
//!                         |                v
//!                         |           +--------+
//!                         +---------- | failed | --- resume() ---> reconnecting (attempt 1)
//!                          path up    +--------+
//!
//!   any state --- close() ---> disconnected (terminal)
//! ```
//!
//! Every change emits `StateChange`; gaining a primary also emits `Connected`, each attempt
//! `Reconnecting` (and [`Command::Reconnect`] for the caller), giving up `Failed`.
//! `resume()` on a connected or connecting peer probes every path at once.
//!
//! # Profiles
//!
//! | | `stable` (default) | `unstable` | `low-bandwidth` |
//! |---|---|---|---|
//! | probe interval (busy) | 1 s | 500 ms | 5 s |
//! | silence timeout | 200 ms | 150 ms | 1 s |
//! | probe timeout | 1 s | 500 ms | 3 s |
//! | idle probe interval | 25 s | 5 s | 25 s |
//! | idle after | 30 s | 30 s | 60 s |
//! | connect timeout | 10 s | 10 s | 20 s |
//! | failure threshold | 3 | 2 | 3 |
//! | recovery threshold | 5 | 8 | 3 |
//! | max latency | 500 ms | 800 ms | 1500 ms |
//! | degraded above | 200 ms | 300 ms | 600 ms |
//! | relay switch above | 200 ms | 200 ms | 200 ms |
//! | backoff base / max | 2 s / 60 s | 1 s / 30 s | 5 s / 120 s |
//! | backoff attempts / jitter | 10 / ±30 % | 20 / ±30 % | 10 / ±30 % |
//! | queue | 256 packets | 512 packets | 64 packets |
//!
//! # Driving a connection
//!
//! * Paths: `add_path(Direct(addr))` when the punch proves an endpoint, `add_path(Relay(id))`
//!   for each bound relay ([`RelayId`]: the relay's name), `remove_path` when either goes away.
//!   [`crate::node::Node`] does all of this for every peer.
//! * Probes: for each [`ProbeTransmit`] `{ path, txid }`, encode
//!   `Probe { kind: Probe, from: me, txid }` with the peer's probe key and send it on `path`.
//!   Decode authenticated acks and call `handle_probe_ack(path, txid, now)`; it returns false
//!   for a txid it does not own, so acks can be offered to other machines too.
//! * Traffic: `handle_rx(path, now)` for each authenticated (decrypted) packet from the peer,
//!   `handle_tx(now)` for each packet sent or queued to it.
//! * Data: send on `primary()`; with no primary, `enqueue(packet)`. After every input, drain
//!   `poll_flush()` (queued packets, oldest first, once there is a primary) before newer
//!   packets, then `poll_transmit`, `poll_event` and `poll_command` (`Reconnect`: refresh
//!   candidates from the control plane and punch again) until `None`.
//! * Time: call `handle_timeout(now)` at `poll_timeout()`.

mod health;
mod manager;
mod path;
mod profile;
mod queue;
mod table;

pub use health::PathHealth;
pub use manager::relay_choice::{BETTER_BY, BETTER_FOR, JITTER_WEIGHT};
pub use manager::{
    Command, ConnEvent, ConnMetrics, ConnState, Connection, PathMetrics, PrimaryReason,
    ProbeTransmit, SetPrimaryError, Timer, Wake, CHECK_MARGIN, CHECK_MIN_WAIT, CHECK_PROBES,
    CHECK_SPACING, IDLE_COALESCE, IDLE_STANDBY_FACTOR, RELAY_REVERT_HOLD, RELAY_TRIAL_SAMPLES,
};
pub use path::{InvalidPath, Latency, PathId, PathKind, Rank, RelayId};
pub use profile::{Profile, ProfileError, ProfileKind, UnknownProfile};
pub use queue::PacketQueue;

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests;
