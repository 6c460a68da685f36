//! Building blocks for the connection-manager scenarios (`tests/tests/failover.rs`,
//! `tests/tests/idle_cost.rs`): a control plane with two relays on emulated WAN hosts, pairs of
//! agents behind two home routers, each agent's view of a peer from `rally peers --json`, a
//! timestamped ping stream (`ping -D`) with its gap and loss analysis, a `rally events
//! --follow` reader, and the process and interface counters the idle-cost figures come from.
//!
//! Everything here measures and reports; the tests decide what to assert (behaviour, never
//! timings: the machine is shared and noisy).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod counters;
mod events;
mod ping;
mod udp_stream;
mod view;
mod world;

pub use counters::{agent_pid, cpu_time, link_bytes, probes_sent, vm_rss_kib, LinkBytes};
pub use events::{event_to_relay_after, failover_event, json_lines, EventFollower};
pub use ping::{Outage, PingLog, PingStream, Reply};
pub use udp_stream::{UdpStream, ECHO_PORT};
pub use view::{view, wait_view, PathView, View};
pub use world::{init_control, wait_netcheck, Pair, World};

/// How long an agent may take to register with the control plane.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll interval for `rally peers --json` while waiting for a route to change.
pub const VIEW_POLL: Duration = Duration::from_millis(100);

/// The current time as Unix seconds (the clock `ping -D` stamps replies with).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `median [min–max]` of `values`, formatted by `fmt`; `-` when empty.
pub fn spread<T: Copy + PartialOrd>(values: &[T], fmt: impl Fn(T) -> String) -> String {
    let mut v: Vec<T> = values.to_vec();
    v.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(&lo), Some(&mid), Some(&hi)) => {
            format!("{} median [{}–{}]", fmt(mid), fmt(lo), fmt(hi))
        }
        _ => "-".into(),
    }
}

/// `420 ms`.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// `420 ms` from seconds.
pub fn secs_ms(s: f64) -> String {
    format!("{:.0} ms", s * 1000.0)
}

#[cfg(test)]
mod tests;
