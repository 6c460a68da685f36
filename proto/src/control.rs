//! Messages on the control channel between an agent and the control plane.
//!
//! The agent opens one bidirectional QUIC stream and speaks first:
//! `Hello` → `Challenge` → `Register` (signed) → `Registered`, then any number of `Request`s,
//! each answered by a `Response` with the same id. The control plane pushes the agent's peers:
//! one full `PeerMap` after registration (and whenever the agent asks with `SyncPeers`), then a
//! `PeerDelta` for each batch of changes. Both carry a version that grows by one per message of
//! the session, so a delta that does not follow the agent's version is detected
//! ([`crate::peermap::PeerView`]). A full map larger than one page travels as `PeerPage`s of the
//! same version followed by the `PeerMap` that ends it ([`crate::peermap::MapPages`]); a large
//! batch of changes travels as several deltas. No message the control plane sends exceeds
//! [`crate::frame::MAX_FRAME_LEN`], whatever the size of a party.
//!
//! Every size and count an agent sends is bounded ([`ClientMsg::validate`]); the control plane
//! refuses a message over a bound with [`ErrorCode::TooLarge`] instead of storing it.

use std::net::{Ipv4Addr, SocketAddr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::key::Key32;

mod validate;
pub use validate::{validate_endpoints, validate_name, validate_nat, ValidationError};

/// Longest agent or party name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most endpoints an agent may report.
pub const MAX_ENDPOINTS: usize = 16;
/// Most relays a NAT report may list.
pub const MAX_NAT_RELAYS: usize = 16;
/// Longest relay address (`host:port`) in a NAT report, in bytes.
pub const MAX_RELAY_ADDR_LEN: usize = 255;
/// Most parties one agent may belong to (a relay token names them all).
pub const MAX_PARTIES_PER_AGENT: usize = crate::token::MAX_TOKEN_PARTIES;
/// Largest frame an agent may send: requests are small, only peer maps are big (and only the
/// control plane sends those).
pub const MAX_CLIENT_FRAME_LEN: usize = 64 * 1024;
/// Longest `party` argument of `leave_party` (a name, or an id in 16 hex digits).
const MAX_PARTY_ARG_LEN: usize = MAX_NAME_LEN;

/// Agent → control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Hello {
        version: u16,
        identity: Key32,
    },
    Register {
        name: String,
        wg_key: Key32,
        endpoints: Vec<SocketAddr>,
        signature: Sig64,
    },
    Request {
        id: u64,
        body: Request,
    },
}

/// What an agent asks of the control plane once registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    CreateParty {
        name: String,
        #[serde(default)]
        max_uses: Option<u32>,
        #[serde(default)]
        expires_in_secs: Option<u64>,
    },
    JoinParty {
        code: String,
    },
    LeaveParty {
        party: String,
    },
    ListParties,
    UpdateEndpoints {
        endpoints: Vec<SocketAddr>,
    },
    /// The agent's latest NAT findings (kept and shown to its peers).
    ReportNat {
        nat: NatReport,
    },
    /// A fresh relay token (the control plane also pushes one with every peer map).
    RelayToken,
    /// Ask the control plane to have this agent and `peer` punch towards each other now.
    Punch {
        peer: Key32,
    },
    /// Send a full peer map next (the agent's view fell out of step with the deltas).
    SyncPeers,
}

/// Control plane → agent.
///
/// (De)serialized as `{"type": …, fields…}`; see [`fast_tagged`] for how peer maps and deltas are
/// read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// `remote = "Self"`: the derives become inherent `ServerMsg::serialize`/`deserialize`, which the
// trait impls below call (the latter only for the messages it does not read itself).
#[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Challenge {
        nonce: Key32,
    },
    Registered {
        peer_id: Key32,
        name: String,
        virtual_ip: Ipv4Addr,
        /// The agent's address as the control plane saw it.
        observed: SocketAddr,
    },
    Response {
        id: u64,
        result: Result<Response, ErrorReply>,
    },
    /// A first part of a full map too large for one frame: the agent keeps it until the
    /// [`ServerMsg::PeerMap`] of the same version, which carries the last part.
    PeerPage {
        version: u64,
        #[serde(serialize_with = "wire_peers")]
        peers: Vec<PeerInfo>,
    },
    /// Every peer the agent may see (with the pages before it of the same version); replaces
    /// the agent's map and sets its version.
    PeerMap {
        version: u64,
        #[serde(serialize_with = "wire_peers")]
        peers: Vec<PeerInfo>,
    },
    /// Changes to the agent's map; applies only on top of version `version - 1`.
    PeerDelta {
        version: u64,
        changes: Vec<PeerChange>,
    },
    /// The relays to use and a token that lets this agent bind at them.
    Relays {
        relays: Vec<RelayEntry>,
        /// URL-safe base64 of a [`crate::token::RelayToken`] signed by the control plane.
        token: String,
        expires_at: u64,
    },
    /// Punch towards `peer` now: send probes to `candidates`, starting after `start_in_ms`.
    Punch {
        peer: Key32,
        candidates: Vec<SocketAddr>,
        start_in_ms: u32,
    },
    /// Sent before the control plane closes the stream.
    Error(ErrorReply),
}

/// Successful answers to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    PartyCreated {
        party: PartyInfo,
        invite: String,
    },
    Joined {
        party: PartyInfo,
        /// The name this agent goes by from now on, when another member of the party held the
        /// one it asked for (`laptop` → `laptop-2`); absent when the name was kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        renamed: Option<String>,
    },
    Left {
        party: PartyInfo,
    },
    Parties {
        parties: Vec<PartyInfo>,
    },
    RelayToken {
        token: String,
        expires_at: u64,
    },
    Ok,
}

/// A refusal, with a machine-readable code and a sentence for the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    VersionMismatch,
    AuthFailed,
    NotRegistered,
    InviteInvalid,
    InviteUnknown,
    InviteExpired,
    InviteUsedUp,
    WrongControlPlane,
    RateLimited,
    NotFound,
    AddressSpaceFull,
    Internal,
    /// A size or count over its bound (names, endpoints, NAT report, frame).
    TooLarge,
    /// The WireGuard key is registered by another agent.
    KeyInUse,
    /// The agent already belongs to [`MAX_PARTIES_PER_AGENT`] parties.
    TooManyParties,
    /// Registration refused: too many new identities from this address, or registration closed.
    RegistrationRefused,
    /// A code this version does not know (sent by a newer control plane).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::InviteInvalid => "invite_invalid",
            ErrorCode::InviteUnknown => "invite_unknown",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::InviteUsedUp => "invite_used_up",
            ErrorCode::WrongControlPlane => "wrong_control_plane",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AddressSpaceFull => "address_space_full",
            ErrorCode::Internal => "internal",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::KeyInUse => "key_in_use",
            ErrorCode::TooManyParties => "too_many_parties",
            ErrorCode::RegistrationRefused => "registration_refused",
            ErrorCode::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyInfo {
    /// 16 hex digits.
    pub id: String,
    pub name: String,
    pub owner: Key32,
    pub members: u32,
}

/// A peer as the control plane introduces it: only ever one that shares a party with the
/// receiving agent.
///
/// Serialized (the agent's peer cache) as an object with the field names below. On the control
/// channel it travels in the compact form of [`PeerInfo::wire`], an array of the fields in this
/// order; reading accepts either form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: Key32,
    pub name: String,
    pub wg_key: Key32,
    pub virtual_ip: Ipv4Addr,
    pub endpoints: Vec<SocketAddr>,
    /// Names of the parties the two agents share.
    pub parties: Vec<String>,
    /// The peer's NAT findings, if it has reported any.
    #[serde(default)]
    pub nat: Option<NatReport>,
}

impl PeerInfo {
    /// The compact form used on the control channel (protocol 3): the array
    /// `[peer_id, name, wg_key, virtual_ip, endpoints, parties]`, with `nat` as a seventh
    /// element only when there is a report. No field names: a peer entry is about a third
    /// shorter than the object, and a crowd's peer maps are mostly peer entries.
    pub fn wire(&self) -> WirePeer<'_> {
        WirePeer(self)
    }
}

/// A [`PeerInfo`] serialized in its wire form; see [`PeerInfo::wire`].
#[derive(Clone, Copy, Debug)]
pub struct WirePeer<'a>(&'a PeerInfo);

impl Serialize for WirePeer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let p = self.0;
        let mut t = s.serialize_tuple(if p.nat.is_some() { 7 } else { 6 })?;
        t.serialize_element(&p.peer_id)?;
        t.serialize_element(&p.name)?;
        t.serialize_element(&p.wg_key)?;
        t.serialize_element(&p.virtual_ip)?;
        t.serialize_element(&p.endpoints)?;
        t.serialize_element(&p.parties)?;
        if let Some(nat) = &p.nat {
            t.serialize_element(nat)?;
        }
        t.end()
    }
}

fn wire_peer<S: Serializer>(peer: &PeerInfo, s: S) -> Result<S::Ok, S::Error> {
    peer.wire().serialize(s)
}

fn wire_peers<S: Serializer>(peers: &[PeerInfo], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(peers.iter().map(PeerInfo::wire))
}

/// One change in a [`ServerMsg::PeerDelta`]: the latest state of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "op", rename_all = "snake_case")]
pub enum PeerChange {
    /// The peer as it is now (added, or changed in any field).
    Upsert {
        #[serde(serialize_with = "wire_peer")]
        peer: PeerInfo,
    },
    /// The peer no longer shares a party with the agent.
    Remove { peer_id: Key32 },
}

impl PeerChange {
    /// The peer this change is about.
    pub fn peer_id(&self) -> Key32 {
        match self {
            PeerChange::Upsert { peer } => peer.peer_id,
            PeerChange::Remove { peer_id } => *peer_id,
        }
    }
}

mod fast_tagged;

/// A relay as the control plane hands it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEntry {
    pub name: String,
    /// `host:port`.
    pub addr: String,
    /// `host:port` of the relay's TLS-over-TCP listener, if it has one. Absent from older
    /// control planes' messages; older agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// How agents verify the relay on `tcp`: its TLS key, which they pin...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_key: Option<Key32>,
    /// ...or, instead of `tcp_key`, the DNS name the relay's certificate (an operator's, from
    /// a certificate authority) must be valid for: agents verify the chain against their
    /// trusted roots. Exactly one of `tcp_key` and `tcp_name` comes with `tcp`; older agents,
    /// which know only `tcp_key`, skip `tcp` for a relay that has `tcp_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_name: Option<String>,
}

/// How a NAT maps or filters (RFC 4787 terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatBehavior {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    #[default]
    Unknown,
}

impl NatBehavior {
    /// Whether this mapping gives a new public port per destination (hard to punch).
    pub fn is_endpoint_dependent(self) -> bool {
        matches!(
            self,
            NatBehavior::AddressDependent | NatBehavior::AddressAndPortDependent
        )
    }
}

/// What `rally netcheck` found.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct NatReport {
    pub udp: bool,
    pub mapping: NatBehavior,
    pub filtering: NatBehavior,
    pub port_preserving: bool,
    pub public_endpoint: Option<SocketAddr>,
    pub relays: Vec<RelayLatency>,
    /// The external endpoint of the gateway port mapping (PCP, NAT-PMP or UPnP IGD) the agent
    /// holds for its UDP port: reachable from anyone, even when `mapping` is
    /// endpoint-dependent. Absent on the wire when there is none (older peers ignore it).
    /// IPv4 only: the agent maps its IPv4 port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_endpoint: Option<std::net::SocketAddrV4>,
    /// For an endpoint-dependent mapping that looked sequential (the netcheck's consecutive
    /// mappings a small step apart): that step, so a peer can predict the next ports.
    /// Absent otherwise (older peers ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_delta: Option<i16>,
}

impl Eq for NatReport {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayLatency {
    pub name: String,
    pub addr: String,
    pub latency_ms: Option<f64>,
}

/// A 64-byte ed25519 signature, shown as URL-safe base64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig64(pub [u8; 64]);

impl std::fmt::Debug for Sig64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sig64(..)")
    }
}

impl Serialize for Sig64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Sig64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let b = URL_SAFE_NO_PAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        let a: [u8; 64] = b
            .try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))?;
        Ok(Sig64(a))
    }
}

#[cfg(test)]
mod tests;
