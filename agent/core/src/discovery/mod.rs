//! LAN game discovery across the party: the rules, without IO.
//!
//! A broadcast (limited 255.255.255.255 or the overlay's directed broadcast) that a program on
//! this member sends goes to every peer of an enabled shared party; a multicast to a routable
//! group goes only to the peers that subscribed to it. On the receiving side a packet from a
//! peer is delivered to the TUN device once (duplicates suppressed), within the sender's
//! budget ([`budget`]), only if it came from a member of an enabled shared party to a port that
//! is not turned off, and for multicast only if a program here listens to the group. What came
//! from a peer is never sent on: the engine writes it to the TUN device, and only packets the
//! kernel routes out (the TUN read side and the capture of outgoing broadcasts) are forwarded.
//!
//! Subscriptions travel between peers inside the tunnel as a tiny message
//! ([`packet::subscription_packet`]) carrying the whole set of groups.

pub mod budget;
pub mod packet;
mod stats;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rally_proto::Key32;

pub use packet::{classify, Kind};
pub use stats::{Counters, DiscoveryStatus, FlowStatus, PeerGroups};

use budget::Budgets;
use stats::Flows;

/// Default per-source cap, packets per second.
pub const DEFAULT_RATE: u32 = 20;
/// A packet seen again from the same source within this window is a duplicate.
const DEDUP_WINDOW: Duration = Duration::from_millis(250);
/// Packets remembered for duplicate suppression.
const DEDUP_MAX: usize = 4096;
/// A source capped again after this long without a capped packet is a new episode (event).
const CAP_EPISODE: Duration = Duration::from_secs(10);
/// Sources whose last capped packet is remembered.
const CAPPED_MAX: usize = 1024;

/// What the user set (`rally up --discovery …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub enabled: bool,
    /// Per-source cap in packets per second (sending and receiving).
    pub rate: u32,
    /// Destination ports never forwarded.
    pub blocked_ports: BTreeSet<u16>,
    /// Parties whose members get nothing from us and send us nothing.
    pub blocked_parties: BTreeSet<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: true,
            rate: DEFAULT_RATE,
            blocked_ports: BTreeSet::new(),
            blocked_parties: BTreeSet::new(),
        }
    }
}

/// Why discovery refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Discovery is off, or for this port, or for every party shared with the peer.
    Disabled,
    /// Over the source's budget.
    Capped,
    Duplicate,
    /// A multicast for a group nobody here listens to.
    Unsubscribed,
    Malformed,
    /// Read from the TUN device with a source other than our virtual IP: the kernel sent back
    /// something that came from a peer. Never forwarded again.
    Foreign,
}

/// Where a local packet was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Routed into the TUN device by the kernel: its source must be our virtual IP.
    Tun,
    /// Captured leaving the physical default-route interface: its LAN source is rewritten.
    Capture,
}

/// Where a packet from a local program goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// Every peer of an enabled shared party ([`Discovery::peer_allowed`]).
    AllPeers,
    /// The peers subscribed to this group ([`Discovery::subscribers`]).
    Subscribers(Ipv4Addr),
}

/// The verdict on a packet from a local program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send the (rewritten) packet to these targets.
    Forward(Targets),
    /// An IGMP message: local memberships may have changed.
    Membership,
    Dropped(Drop),
    /// Not discovery's: the caller routes it as unicast.
    NotDiscovery,
}

/// The verdict on a packet decrypted from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Write it to the TUN device.
    Deliver,
    /// A subscription message: the peer now listens to these groups (already recorded).
    Subscribed(Vec<Ipv4Addr>),
    Dropped(Drop),
    NotDiscovery,
}

/// What `rally events` hears of discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A sender went over its budget (once per episode: after [`CAP_EPISODE`] without a
    /// capped packet it is news again). `source` is our own virtual IP for our programs.
    Capped { source: Ipv4Addr, port: u16 },
}

/// The discovery state of one agent.
#[derive(Debug)]
pub struct Discovery {
    cfg: DiscoveryConfig,
    own_vip: Ipv4Addr,
    directed: Ipv4Addr,
    send_budget: Budgets,
    recv_budget: Budgets,
    seen: VecDeque<(Instant, u64)>,
    seen_set: HashMap<u64, Instant>,
    local_groups: BTreeSet<Ipv4Addr>,
    peer_groups: HashMap<Key32, BTreeSet<Ipv4Addr>>,
    flows: Flows,
    counters: Counters,
    capped_at: HashMap<Ipv4Addr, Instant>,
    events: VecDeque<DiscoveryEvent>,
}

impl Discovery {
    /// `own_vip` and `prefix` are this agent's overlay address (for the directed broadcast).
    pub fn new(cfg: DiscoveryConfig, own_vip: Ipv4Addr, prefix: u8) -> Discovery {
        let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let directed = Ipv4Addr::from(u32::from(own_vip) | host_bits);
        Discovery {
            send_budget: Budgets::new(cfg.rate),
            recv_budget: Budgets::new(cfg.rate),
            cfg,
            own_vip,
            directed,
            seen: VecDeque::new(),
            seen_set: HashMap::new(),
            local_groups: BTreeSet::new(),
            peer_groups: HashMap::new(),
            flows: Flows::default(),
            counters: Counters::default(),
            capped_at: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.cfg
    }

    pub fn directed_broadcast(&self) -> Ipv4Addr {
        self.directed
    }

    /// Whether `dst` is an address discovery handles (for the engine's TUN-read path).
    pub fn is_discovery_destination(&self, dst: Ipv4Addr) -> bool {
        dst == Ipv4Addr::BROADCAST || dst == self.directed || dst.is_multicast()
    }

    /// Whether a packet from a peer is discovery's at all (a broadcast, a multicast or a
    /// subscription message): a cheap look at two header fields, for the receive path.
    pub fn is_discovery_packet(&self, p: &[u8]) -> bool {
        match (p.get(9), p.get(16..20)) {
            (Some(&proto), Some(d)) => {
                proto == packet::SUBSCRIPTION_PROTO
                    || self.is_discovery_destination(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
            }
            _ => false,
        }
    }

    /// A packet a local program sent (read from the TUN device, or captured leaving the
    /// physical interface). Its source is rewritten to our virtual IP with right checksums,
    /// so the peers deliver it as coming from us and replies come back over the overlay.
    pub fn handle_local(&mut self, packet: &mut [u8], origin: Origin, now: Instant) -> Outbound {
        let kind = classify(packet, self.directed);
        if origin == Origin::Tun
            && kind != Kind::Other
            && packet::parse_ipv4(packet).is_some_and(|ip| ip.src != self.own_vip)
        {
            self.counters.dropped_foreign += 1;
            return Outbound::Dropped(Drop::Foreign);
        }
        let (port, target) = match kind {
            Kind::Igmp => return Outbound::Membership,
            Kind::Other => return Outbound::NotDiscovery,
            Kind::Broadcast { port, .. } => (port, Targets::AllPeers),
            Kind::Multicast { group, port } => (port, Targets::Subscribers(group)),
        };
        let flow = self.flows.get(kind, now);
        if !self.cfg.enabled || self.cfg.blocked_ports.contains(&port) {
            flow.dropped += 1;
            self.counters.dropped_disabled += 1;
            return Outbound::Dropped(Drop::Disabled);
        }
        if !self.send_budget.take(self.own_vip, now) {
            flow.dropped += 1;
            self.counters.dropped_capped += 1;
            self.note_capped(self.own_vip, port, now);
            return Outbound::Dropped(Drop::Capped);
        }
        if !packet::rewrite_source(packet, self.own_vip) {
            self.counters.dropped_malformed += 1;
            return Outbound::Dropped(Drop::Malformed);
        }
        flow.sent += 1;
        flow.last_sender = Some(self.own_vip);
        flow.count(now);
        self.counters.forwarded += 1;
        Outbound::Forward(target)
    }

    /// Records how many peers a forwarded packet was encrypted for.
    pub fn note_copies(&mut self, copies: usize) {
        self.counters.copies_sent += copies as u64;
    }

    /// Whether a peer sharing `parties` with us may send and receive discovery traffic.
    pub fn peer_allowed(&self, parties: &[String]) -> bool {
        self.cfg.enabled
            && parties
                .iter()
                .any(|p| !self.cfg.blocked_parties.contains(p))
    }

    /// The peers subscribed to `group`.
    pub fn subscribers(&self, group: Ipv4Addr) -> impl Iterator<Item = &Key32> + '_ {
        self.peer_groups
            .iter()
            .filter(move |(_, g)| g.contains(&group))
            .map(|(k, _)| k)
    }

    /// A packet decrypted from `peer` (whose inner source the engine already checked is the
    /// peer's virtual IP), sharing `parties` with us. A directed broadcast to deliver is
    /// rewritten to the limited broadcast: the kernel delivers that on any device and never
    /// routes it back out, whatever broadcast address the TUN device has.
    pub fn handle_peer_packet(
        &mut self,
        peer: &Key32,
        parties: &[String],
        p: &mut [u8],
        now: Instant,
    ) -> Inbound {
        if p.get(9) == Some(&packet::SUBSCRIPTION_PROTO) {
            return self.handle_subscription(peer, p);
        }
        let kind = classify(p, self.directed);
        let (src, group) = match (kind, packet::parse_ipv4(p)) {
            (Kind::Broadcast { .. }, Some(ip)) => (ip.src, None),
            (Kind::Multicast { group, .. }, Some(ip)) => (ip.src, Some(group)),
            _ => return Inbound::NotDiscovery,
        };
        let verdict = self.check_inbound(kind, parties, src, group, p, now);
        if let (Some(Drop::Capped), Kind::Broadcast { port, .. } | Kind::Multicast { port, .. }) =
            (verdict, kind)
        {
            self.note_capped(src, port, now);
        }
        let flow = self.flows.get(kind, now);
        match verdict {
            None => {
                if matches!(kind, Kind::Broadcast { dst, .. } if dst == self.directed) {
                    packet::rewrite_destination(p, Ipv4Addr::BROADCAST);
                }
                flow.received += 1;
                flow.last_sender = Some(src);
                flow.count(now);
                self.counters.delivered += 1;
                Inbound::Deliver
            }
            Some(why) => {
                flow.dropped += 1;
                let c = &mut self.counters;
                match why {
                    Drop::Disabled => c.dropped_disabled += 1,
                    Drop::Capped => c.dropped_capped += 1,
                    Drop::Duplicate => c.dropped_duplicate += 1,
                    Drop::Unsubscribed => c.dropped_unsubscribed += 1,
                    Drop::Malformed => c.dropped_malformed += 1,
                    Drop::Foreign => c.dropped_foreign += 1,
                }
                Inbound::Dropped(why)
            }
        }
    }

    fn check_inbound(
        &mut self,
        kind: Kind,
        parties: &[String],
        src: Ipv4Addr,
        group: Option<Ipv4Addr>,
        p: &[u8],
        now: Instant,
    ) -> Option<Drop> {
        let port = match kind {
            Kind::Broadcast { port, .. } | Kind::Multicast { port, .. } => port,
            _ => return Some(Drop::Malformed),
        };
        if !self.peer_allowed(parties) || self.cfg.blocked_ports.contains(&port) {
            return Some(Drop::Disabled);
        }
        if group.is_some_and(|g| !self.local_groups.contains(&g)) {
            return Some(Drop::Unsubscribed);
        }
        if self.is_duplicate(p, now) {
            return Some(Drop::Duplicate);
        }
        if !self.recv_budget.take(src, now) {
            return Some(Drop::Capped);
        }
        None
    }

    fn handle_subscription(&mut self, peer: &Key32, p: &[u8]) -> Inbound {
        match packet::parse_subscription(p) {
            Ok((_, groups)) => {
                self.counters.subscription_messages += 1;
                if groups.is_empty() {
                    self.peer_groups.remove(peer);
                } else {
                    self.peer_groups
                        .insert(*peer, groups.iter().copied().collect());
                }
                Inbound::Subscribed(groups)
            }
            Err(_) => {
                self.counters.dropped_malformed += 1;
                Inbound::Dropped(Drop::Malformed)
            }
        }
    }

    fn note_capped(&mut self, source: Ipv4Addr, port: u16, now: Instant) {
        if self.capped_at.len() >= CAPPED_MAX && !self.capped_at.contains_key(&source) {
            self.capped_at.clear();
        }
        let last = self.capped_at.insert(source, now);
        if last.is_none_or(|t| now.saturating_duration_since(t) >= CAP_EPISODE) {
            self.events
                .push_back(DiscoveryEvent::Capped { source, port });
        }
    }

    /// The next event for `rally events`.
    pub fn poll_event(&mut self) -> Option<DiscoveryEvent> {
        self.events.pop_front()
    }

    /// Duplicate suppression: the same source, destination and payload within
    /// [`DEDUP_WINDOW`] is delivered once.
    fn is_duplicate(&mut self, p: &[u8], now: Instant) -> bool {
        while let Some(&(at, h)) = self.seen.front() {
            if now.saturating_duration_since(at) < DEDUP_WINDOW && self.seen.len() < DEDUP_MAX {
                break;
            }
            self.seen.pop_front();
            if self.seen_set.get(&h) == Some(&at) {
                self.seen_set.remove(&h);
            }
        }
        let h = fingerprint(p);
        if self.seen_set.contains_key(&h) {
            return true;
        }
        self.seen.push_back((now, h));
        self.seen_set.insert(h, now);
        false
    }

    /// Replaces the set of groups programs here listen to; true when it changed (the caller
    /// then joins/leaves on the TUN device and tells the peers).
    pub fn set_local_groups(&mut self, groups: BTreeSet<Ipv4Addr>) -> bool {
        let groups: BTreeSet<Ipv4Addr> = groups
            .into_iter()
            .filter(|g| packet::is_forwarded_group(*g))
            .take(packet::MAX_GROUPS)
            .collect();
        if groups == self.local_groups {
            return false;
        }
        self.local_groups = groups;
        true
    }

    pub fn local_groups(&self) -> &BTreeSet<Ipv4Addr> {
        &self.local_groups
    }

    /// Our subscription message for the peer at `peer_vip`.
    pub fn subscription_for(&self, peer_vip: Ipv4Addr) -> Vec<u8> {
        let groups: Vec<Ipv4Addr> = self.local_groups.iter().copied().collect();
        packet::subscription_packet(self.own_vip, peer_vip, &groups)
    }

    /// Forgets a peer that left every shared party.
    pub fn remove_peer(&mut self, peer: &Key32) {
        self.peer_groups.remove(peer);
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// `rally discovery`: settings, groups, flows; `name` names a peer.
    pub fn status(&self, now: Instant, name: impl Fn(&Key32) -> String) -> DiscoveryStatus {
        let mut peers: Vec<PeerGroups> = self
            .peer_groups
            .iter()
            .map(|(k, g)| PeerGroups {
                peer: name(k),
                groups: g.iter().copied().collect(),
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        DiscoveryStatus {
            enabled: self.cfg.enabled,
            rate_limit: self.cfg.rate,
            blocked_ports: self.cfg.blocked_ports.iter().copied().collect(),
            blocked_parties: self.cfg.blocked_parties.iter().cloned().collect(),
            local_groups: self.local_groups.iter().copied().collect(),
            peer_groups: peers,
            flows: self.flows.status(now),
            counters: self.counters,
        }
    }
}

/// FNV-1a over the packet from its source address on (TTL and checksum excluded, so the same
/// datagram on two paths matches).
fn fingerprint(p: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.get(12..).unwrap_or_default() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests;
