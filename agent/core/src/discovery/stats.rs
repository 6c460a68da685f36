//! What `rally discovery` and the metrics show: counters, and per flow (a broadcast port or a
//! multicast group and port) packets each way, a rate and the last sender.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Kind;

/// Flows tracked at once; the one idle longest is forgotten first.
const MAX_FLOWS: usize = 256;

/// Discovery's counters (`rally metrics`, Prometheus).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Local packets forwarded (each once, whatever the number of peers).
    pub forwarded: u64,
    /// Encrypted copies sent to peers.
    pub copies_sent: u64,
    /// Packets from peers written to the TUN device.
    pub delivered: u64,
    pub dropped_capped: u64,
    pub dropped_duplicate: u64,
    pub dropped_disabled: u64,
    pub dropped_unsubscribed: u64,
    pub dropped_malformed: u64,
    /// Broadcasts read back from the TUN device with a foreign source (loop prevention).
    pub dropped_foreign: u64,
    pub subscription_messages: u64,
}

/// One flow in `rally discovery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowStatus {
    /// `broadcast` or `multicast`.
    pub kind: String,
    /// The destination: 255.255.255.255, the directed broadcast, or the group.
    pub address: Ipv4Addr,
    pub port: u16,
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
    /// Packets forwarded or delivered in the last whole second.
    pub rate_pps: u64,
    pub last_sender: Option<Ipv4Addr>,
    pub last_seen_ms_ago: u64,
}

/// The groups one peer listens to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerGroups {
    pub peer: String,
    pub groups: Vec<Ipv4Addr>,
}

/// `rally discovery --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    pub enabled: bool,
    pub rate_limit: u32,
    pub blocked_ports: Vec<u16>,
    pub blocked_parties: Vec<String>,
    /// Groups programs on this member listen to (joined on the TUN device, told to peers).
    pub local_groups: Vec<Ipv4Addr>,
    pub peer_groups: Vec<PeerGroups>,
    pub flows: Vec<FlowStatus>,
    pub counters: Counters,
}

#[derive(Debug)]
pub(super) struct Flow {
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
    pub last_sender: Option<Ipv4Addr>,
    last_at: Instant,
    second: Instant,
    this_second: u64,
    last_second: u64,
}

impl Flow {
    /// Counts one packet in the per-second rate.
    pub fn count(&mut self, now: Instant) {
        self.roll(now);
        self.this_second += 1;
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.second);
        if elapsed >= Duration::from_secs(2) {
            self.last_second = 0;
            self.this_second = 0;
            self.second = now;
        } else if elapsed >= Duration::from_secs(1) {
            self.last_second = self.this_second;
            self.this_second = 0;
            self.second += Duration::from_secs(1);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Flows(HashMap<(Ipv4Addr, u16), Flow>);

impl Flows {
    pub fn get(&mut self, kind: Kind, now: Instant) -> &mut Flow {
        let key = match kind {
            Kind::Broadcast { dst, port } => (dst, port),
            Kind::Multicast { group, port } => (group, port),
            Kind::Igmp | Kind::Other => (Ipv4Addr::UNSPECIFIED, 0),
        };
        if !self.0.contains_key(&key) && self.0.len() >= MAX_FLOWS {
            if let Some(k) = self
                .0
                .iter()
                .min_by_key(|(_, f)| f.last_at)
                .map(|(k, _)| *k)
            {
                self.0.remove(&k);
            }
        }
        let f = self.0.entry(key).or_insert(Flow {
            sent: 0,
            received: 0,
            dropped: 0,
            last_sender: None,
            last_at: now,
            second: now,
            this_second: 0,
            last_second: 0,
        });
        f.last_at = now;
        f
    }

    pub fn status(&self, now: Instant) -> Vec<FlowStatus> {
        let mut rows: Vec<FlowStatus> = self
            .0
            .iter()
            .map(|((addr, port), f)| {
                let stale = now.saturating_duration_since(f.second) >= Duration::from_secs(2);
                let rate = match now.saturating_duration_since(f.second) {
                    _ if stale => 0,
                    d if d >= Duration::from_secs(1) => f.this_second,
                    _ => f.last_second,
                };
                FlowStatus {
                    kind: if addr.is_multicast() {
                        "multicast"
                    } else {
                        "broadcast"
                    }
                    .into(),
                    address: *addr,
                    port: *port,
                    sent: f.sent,
                    received: f.received,
                    dropped: f.dropped,
                    rate_pps: rate,
                    last_sender: f.last_sender,
                    last_seen_ms_ago: now.saturating_duration_since(f.last_at).as_millis() as u64,
                }
            })
            .collect();
        rows.sort_by_key(|r| (r.address, r.port));
        rows
    }
}
