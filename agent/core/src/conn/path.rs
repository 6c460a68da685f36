//! Path identities and their ranking.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// One way to reach a peer.
///
/// Written as `direct:ADDR`, `relay:NAME` or `relay-tcp:NAME` (see [`Display`](fmt::Display)
/// and [`FromStr`]); that is the form in events, metrics and `rally path set-primary`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathId {
    /// A proven direct (punched or LAN) endpoint of the peer.
    Direct(SocketAddr),
    /// Through the relay with this name, over UDP.
    Relay(RelayId),
    /// Through the relay with this name, over TLS on TCP (for networks that block UDP).
    RelayTcp(RelayId),
}

/// A relay's identity everywhere in the agent: its name from the control plane. Cloning it is
/// a reference count, not an allocation, so it can name the path of every relayed packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(Arc<str>);

impl RelayId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for RelayId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for RelayId {
    fn from(s: &str) -> Self {
        RelayId(Arc::from(s))
    }
}

impl From<String> for RelayId {
    fn from(s: String) -> Self {
        RelayId(Arc::from(s))
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for RelayId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

/// The coarse priority of a path: direct before relay, a relay over UDP before any over TCP.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    Relay,
    RelayTcp,
}

impl PathKind {
    /// Whether the path goes through a relay (over either transport).
    pub fn is_relay(self) -> bool {
        self != PathKind::Direct
    }
}

impl PathId {
    pub fn kind(&self) -> PathKind {
        match self {
            PathId::Direct(_) => PathKind::Direct,
            PathId::Relay(_) => PathKind::Relay,
            PathId::RelayTcp(_) => PathKind::RelayTcp,
        }
    }

    /// The relay's name, for a relayed path (over either transport).
    pub fn relay(&self) -> Option<&str> {
        self.relay_id().map(RelayId::as_str)
    }

    /// The relay's identity, for a relayed path (over either transport).
    pub fn relay_id(&self) -> Option<&RelayId> {
        match self {
            PathId::Relay(name) | PathId::RelayTcp(name) => Some(name),
            PathId::Direct(_) => None,
        }
    }

    /// The same relay over the other transport (`relay:r1` ↔ `relay-tcp:r1`); `None` for a
    /// direct path. A probe sent on one may be answered on the other: the relay delivers to
    /// the session of ours it heard from last.
    pub fn sibling(&self) -> Option<PathId> {
        match self {
            PathId::Relay(name) => Some(PathId::RelayTcp(name.clone())),
            PathId::RelayTcp(name) => Some(PathId::Relay(name.clone())),
            PathId::Direct(_) => None,
        }
    }

    /// The peer's endpoint, for a direct path.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            PathId::Direct(a) => Some(*a),
            PathId::Relay(_) | PathId::RelayTcp(_) => None,
        }
    }
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathId::Direct(a) => write!(f, "direct:{a}"),
            PathId::Relay(name) => write!(f, "relay:{name}"),
            PathId::RelayTcp(name) => write!(f, "relay-tcp:{name}"),
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
            PathKind::RelayTcp => "relay-tcp",
        })
    }
}

/// A path written in none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid path {0:?}: expected direct:IP:PORT, relay:NAME, relay-tcp:NAME, IP:PORT or a relay name"
)]
pub struct InvalidPath(pub String);

impl FromStr for PathId {
    type Err = InvalidPath;

    /// Accepts `direct:IP:PORT`, `relay:NAME`, `relay-tcp:NAME`, a bare `IP:PORT` (direct) or a
    /// bare relay name (over UDP).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidPath(s.to_string());
        let valid_name = |n: &str| !n.is_empty() && !n.chars().any(char::is_whitespace);
        if let Some(addr) = s.strip_prefix("direct:") {
            return addr.parse().map(PathId::Direct).map_err(|_| invalid());
        }
        if let Some(name) = s.strip_prefix("relay:") {
            return valid_name(name)
                .then(|| PathId::Relay(name.into()))
                .ok_or_else(invalid);
        }
        if let Some(name) = s.strip_prefix("relay-tcp:") {
            return valid_name(name)
                .then(|| PathId::RelayTcp(name.into()))
                .ok_or_else(invalid);
        }
        if let Ok(addr) = s.parse() {
            return Ok(PathId::Direct(addr));
        }
        valid_name(s)
            .then(|| PathId::Relay(s.into()))
            .ok_or_else(invalid)
    }
}

impl<'de> serde::Deserialize<'de> for PathId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for PathId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A measured latency, or none yet. Derived `Ord`: any measurement sorts before none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Latency {
    Measured(Duration),
    Unmeasured,
}

impl From<Option<Duration>> for Latency {
    fn from(d: Option<Duration>) -> Self {
        d.map_or(Latency::Unmeasured, Latency::Measured)
    }
}

/// The preference order of paths; smaller is better. The field order *is* the policy (derived
/// `Ord`): direct before relay, then lower smoothed latency, unmeasured last, then the path id
/// so the order is total and deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank<'a> {
    pub kind: PathKind,
    pub latency: Latency,
    pub path: &'a PathId,
}

impl<'a> Rank<'a> {
    pub fn new(path: &'a PathId, latency: Option<Duration>) -> Rank<'a> {
        Rank {
            kind: path.kind(),
            latency: latency.into(),
            path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn direct_ranks_before_any_relay_and_relays_by_latency_with_unmeasured_last() {
        let direct = PathId::Direct("203.0.113.2:51820".parse().unwrap());
        let (a, b, c) = (
            PathId::Relay("a".into()),
            PathId::Relay("b".into()),
            PathId::Relay("c".into()),
        );
        let mut ranks = [
            Rank::new(&c, None),
            Rank::new(&b, ms(20)),
            Rank::new(&direct, ms(90)),
            Rank::new(&a, ms(35)),
        ];
        ranks.sort();
        let order: Vec<&PathId> = ranks.iter().map(|r| r.path).collect();
        assert_eq!(order, [&direct, &b, &a, &c]);
    }

    #[test]
    fn a_relay_over_tcp_ranks_below_every_relay_over_udp_even_when_faster() {
        let tcp = PathId::RelayTcp("a".into());
        let udp = PathId::Relay("b".into());
        let mut ranks = [Rank::new(&tcp, ms(5)), Rank::new(&udp, None)];
        ranks.sort();
        assert_eq!(ranks[0].path, &udp);
        assert_eq!(tcp.sibling(), Some(PathId::Relay("a".into())));
        assert_eq!(tcp.relay(), Some("a"));
    }

    #[test]
    fn a_relay_over_tcp_prints_and_parses_as_relay_tcp() {
        let t = PathId::RelayTcp("r1".into());
        assert_eq!(t.to_string(), "relay-tcp:r1");
        assert_eq!("relay-tcp:r1".parse(), Ok(t));
        assert!("relay-tcp:".parse::<PathId>().is_err());
    }

    #[test]
    fn paths_print_and_parse_in_the_cli_form() {
        let d = PathId::Direct("203.0.113.2:51820".parse().unwrap());
        let r = PathId::Relay("eu-1".into());
        assert_eq!(d.to_string(), "direct:203.0.113.2:51820");
        assert_eq!(r.to_string(), "relay:eu-1");
        assert_eq!(d.to_string().parse(), Ok(d.clone()));
        assert_eq!(r.to_string().parse(), Ok(r.clone()));
        assert_eq!("203.0.113.2:51820".parse(), Ok(d));
        assert_eq!("eu-1".parse(), Ok(r));
        assert_eq!(
            "[2001:db8::1]:9".parse::<PathId>().unwrap().to_string(),
            "direct:[2001:db8::1]:9"
        );
        assert!("direct:nowhere".parse::<PathId>().is_err());
        assert!("relay:".parse::<PathId>().is_err());
        assert!("".parse::<PathId>().is_err());
    }

    #[test]
    fn a_path_serializes_as_its_string_form() {
        let r = PathId::Relay("eu-1".into());
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"relay:eu-1\"");
    }
}
