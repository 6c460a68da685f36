//! The types the CLI and the daemon exchange over the control socket, and the JSON the CLI
//! prints from them (`rally status|peers|netcheck --json`, DESIGN.md "JSON shapes").
//!
//! Plain data: no IO. The transport (framing over the Unix socket) is in [`crate::ipc`].

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use rally_proto::control::{NatReport, PartyInfo};
use serde::{Deserialize, Serialize};

use crate::conn::PathMetrics;
use crate::events::{Event, EventType};
use crate::portmap::PortMappingStatus;

/// A peer's connection state, as `rally peers` shows it (DESIGN.md "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Connecting,
    Connected,
    Degraded,
    Reconnecting,
    Failed,
    Disconnected,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Degraded => "degraded",
            PeerState::Reconnecting => "reconnecting",
            PeerState::Failed => "failed",
            PeerState::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a peer's traffic goes now: the `strategy` field of `rally peers --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Straight to the peer's endpoint.
    Direct,
    /// Through a relay (named in `relay`).
    Relay,
    /// No usable path yet (connecting, reconnecting or failed).
    None,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::Relay => "relay",
            Strategy::None => "none",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One row of `rally peers`: the metrics fields of DESIGN.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub peer_id: String,
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub strategy: Strategy,
    pub relay: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub state: PeerState,
    pub latency_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub uptime_seconds: u64,
    pub is_primary: bool,
    pub priority: u32,
    /// Unix seconds.
    pub connected_at: Option<u64>,
    pub parties: Vec<String>,
    pub candidates: Vec<SocketAddr>,
    /// Unix milliseconds when the direct path was proven (absent while relayed).
    pub direct_since_ms: Option<u64>,
    pub failovers: u64,
    pub relay_switches: u64,
    pub queued: usize,
    pub queue_dropped: u64,
    /// Every path with its health, latency and rank.
    pub paths: Vec<PathMetrics>,
    /// Why the primary path is a relay (`both-symmetric`, `udp-blocked`, `punch-timed-out`,
    /// `birthday-failed`, `punching`, `pinned`, `nat-unknown`); absent when it is not a relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_reason: Option<String>,
    /// The peer's NAT findings as it reported them (absent until it has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_nat: Option<rally_proto::control::NatReport>,
    /// The primary path (`direct:IP:PORT`, `relay:NAME`, `relay-tcp:NAME` for a relay over
    /// TLS/TCP); absent while there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The last birthday-punching attempt towards this peer (absent if none ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<BirthdayStatus>,
    /// Each way to a direct path tried towards this peer (LAN, punch, port mapping,
    /// prediction, birthday), with its result (`rally peer why`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub techniques: Vec<TechniqueStatus>,
}

/// One technique towards a direct path and what came of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TechniqueStatus {
    /// `lan`, `punch`, `port-mapping`, `prediction` or `birthday`.
    pub technique: String,
    /// `direct`, `running`, `failed`, `skipped` or `not-tried`.
    pub result: String,
    /// A sentence: why, when, how much.
    pub detail: String,
}

/// One birthday-punching attempt, as `rally peers --json` and `rally peer why` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BirthdayStatus {
    /// `open` (this side opened the sockets) or `probe` (this side probed ports).
    pub role: String,
    /// `running`, `direct`, `failed` or `abandoned`.
    pub outcome: String,
    /// Probes sent (the prober) or sockets opened (the opener).
    pub probes: u32,
    /// Of `probes`, predicted ports (a sequential NAT).
    pub predicted: u32,
    pub sockets: u16,
    /// Bytes this side sent in the attempt.
    pub bytes: u64,
    /// How long ago it started, and how long it ran (absent while running).
    pub started_ms_ago: u64,
    pub took_ms: Option<u64>,
    /// Attempts in a row that failed.
    pub failures: usize,
}

impl PeerStatus {
    /// `relay:NAME` on a relay (`relay-tcp:NAME` over TLS/TCP), else the strategy
    /// (`direct`, `none`).
    pub fn path_label(&self) -> String {
        match (&self.relay, self.strategy, &self.path) {
            (Some(_), Strategy::Relay, Some(p)) if p.starts_with("relay-tcp:") => p.clone(),
            (Some(r), Strategy::Relay, _) => format!("relay:{r}"),
            (_, s, _) => s.to_string(),
        }
    }
}

/// `rally status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub name: String,
    pub peer_id: String,
    pub virtual_ip: Option<Ipv4Addr>,
    pub control: ControlStatus,
    /// This agent's last NAT report; `null` until the first netcheck finished. Its keys are
    /// written sorted, as they always were in `rally status --json`.
    #[serde(serialize_with = "sorted_keys")]
    pub nat: Option<NatReport>,
    pub parties: Vec<PartyInfo>,
    pub listen_port: u16,
    /// The gateway port mapping in effect (`null`: none).
    #[serde(default)]
    pub port_mapping: Option<PortMappingStatus>,
}

/// `rally netcheck --json`: the NAT findings, and the gateway port mapping in effect (`null`:
/// none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetcheckReport {
    #[serde(flatten)]
    pub nat: NatReport,
    pub port_mapping: Option<PortMappingStatus>,
    /// What carries the control channel: `quic`, or `tcp` (TLS over TCP) where UDP is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_transport: Option<String>,
    /// What carries relayed traffic: `udp`, or `tcp` when relays are reached only over TLS
    /// on TCP (UDP blocked); absent while no relay is bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_transport: Option<String>,
    /// The relayed paths bound now: `relay:NAME` over UDP, `relay-tcp:NAME` over TLS/TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relay_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlStatus {
    pub connected: bool,
    pub addr: Option<String>,
    pub error: Option<String>,
    /// `quic`, or `tcp` (TLS over TCP) where UDP is blocked; absent while not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// What the CLI asks of the daemon: one per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum IpcRequest {
    Status,
    Peers,
    PartyCreate {
        name: String,
        max_uses: Option<u32>,
        expires_in_secs: Option<u64>,
    },
    PartyJoin {
        code: String,
    },
    PartyLeave {
        party: String,
    },
    PartyList,
    Netcheck,
    /// Event history; with `follow`, then every new event until the client hangs up.
    Events {
        follow: bool,
        types: Option<Vec<EventType>>,
        peer: Option<String>,
    },
    PeerReconnect {
        peer: String,
    },
    SetPrimary {
        peer: String,
        path: String,
    },
    /// `rally discovery`.
    Discovery,
    Down,
}

/// The daemon's answer (inside an [`IpcResult`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum IpcReply {
    Status(StatusReport),
    Peers {
        peers: Vec<PeerStatus>,
    },
    Party {
        party: PartyInfo,
        invite: Option<String>,
    },
    Parties {
        parties: Vec<PartyInfo>,
    },
    Netcheck(NetcheckReport),
    Discovery(Box<crate::discovery::DiscoveryStatus>),
    Events {
        events: Vec<Event>,
        /// Events this follower missed because it read too slowly.
        missed: u64,
    },
    Ok,
}

impl IpcReply {
    /// The reply's name (its `reply` tag), for "unexpected reply" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            IpcReply::Status(_) => "status",
            IpcReply::Peers { .. } => "peers",
            IpcReply::Party { .. } => "party",
            IpcReply::Parties { .. } => "parties",
            IpcReply::Netcheck(_) => "netcheck",
            IpcReply::Discovery(_) => "discovery",
            IpcReply::Events { .. } => "events",
            IpcReply::Ok => "ok",
        }
    }
}

/// A reply, or the daemon's one-line error.
pub type IpcResult = Result<IpcReply, String>;

/// Writes `value` with the keys of every object sorted (serde_json's own map order).
fn sorted_keys<T: Serialize, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    serde_json::to_value(value)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

/// Finds a peer by name, virtual IP, peer id, or a unique prefix of the id (4+ characters).
pub fn resolve_peer<'a>(peers: &'a [PeerStatus], query: &str) -> Result<&'a PeerStatus, String> {
    if let Some(p) = peers
        .iter()
        .find(|p| p.name == query || p.virtual_ip.to_string() == query || p.peer_id == query)
    {
        return Ok(p);
    }
    let by_prefix: Vec<&PeerStatus> = if query.len() >= 4 {
        peers
            .iter()
            .filter(|p| p.peer_id.starts_with(query))
            .collect()
    } else {
        Vec::new()
    };
    match by_prefix.as_slice() {
        [p] => Ok(p),
        [] => Err(format!("no peer named {query:?} (see `rally peers`)")),
        _ => Err(format!(
            "{query:?} matches several peers; give more of the id"
        )),
    }
}

#[cfg(test)]
mod tests;
