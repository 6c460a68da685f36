//! Typed events (`rally events`): what happened to which peer on which path, a bounded
//! history, and subscribers with filters.
//!
//! Plain synchronous data, no clock and no tokio: the caller passes each event's time (unix
//! milliseconds) and decides how subscribers are woken (the daemon shares the bus in a mutex
//! with the data plane, which publishes; each `rally events --follow` connection polls its
//! subscription every 100 ms). Publishing never blocks and never grows without bound: every
//! subscriber has a bounded queue, and one that falls behind loses its oldest events and is
//! told how many with [`Item::Lagged`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::conn::{ConnEvent, ConnMetrics};

/// Events kept for `rally events` without `--follow`.
pub const DEFAULT_HISTORY: usize = 100;
/// Events a subscriber may fall behind by before it starts losing them.
pub const DEFAULT_SUBSCRIBER_QUEUE: usize = 256;

/// The event types of DESIGN.md; serialized in `snake_case` (`relay_switch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Connected,
    Disconnected,
    Reconnecting,
    Failover,
    RelaySwitch,
    PrimaryChange,
    StateChange,
    NatDetected,
    MetricsUpdate,
    Error,
    /// A sender of LAN game discovery went over its budget (once per episode).
    DiscoveryCapped,
    /// The control channel moved between QUIC and TLS over TCP.
    TransportChange,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
        EventType::Connected,
        EventType::Disconnected,
        EventType::Reconnecting,
        EventType::Failover,
        EventType::RelaySwitch,
        EventType::PrimaryChange,
        EventType::StateChange,
        EventType::NatDetected,
        EventType::MetricsUpdate,
        EventType::Error,
        EventType::DiscoveryCapped,
        EventType::TransportChange,
    ];

    /// The name in JSON and on the command line (`--type relay_switch`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connected => "connected",
            EventType::Disconnected => "disconnected",
            EventType::Reconnecting => "reconnecting",
            EventType::Failover => "failover",
            EventType::RelaySwitch => "relay_switch",
            EventType::PrimaryChange => "primary_change",
            EventType::StateChange => "state_change",
            EventType::NatDetected => "nat_detected",
            EventType::MetricsUpdate => "metrics_update",
            EventType::Error => "error",
            EventType::DiscoveryCapped => "discovery_capped",
            EventType::TransportChange => "transport_change",
        }
    }

    /// Parses a `--type` list: names separated by commas (`failover,relay_switch`).
    pub fn parse_list(s: &str) -> Result<BTreeSet<EventType>, UnknownEventType> {
        s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::parse)
            .collect()
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event type name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}: expected one of connected, disconnected, reconnecting, failover, relay_switch, primary_change, state_change, nat_detected, metrics_update, error, transport_change")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    /// Accepts the `snake_case` name, and `-` for `_` (`relay-switch`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.replace('-', "_");
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

/// One event; serializes to the `rally events --json` line
/// `{ "time", "type", "peer", "path", "message" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub time: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The peer's name, or null for agent-wide events (`nat_detected`).
    pub peer: Option<String>,
    /// The path in `direct:ADDR` / `relay:NAME` form, or null.
    pub path: Option<String>,
    pub message: String,
}

impl Event {
    pub fn new(time: u64, kind: EventType, message: impl Into<String>) -> Event {
        Event {
            time,
            kind,
            peer: None,
            path: None,
            message: message.into(),
        }
    }

    pub fn with_peer(mut self, peer: impl Into<String>) -> Event {
        self.peer = Some(peer.into());
        self
    }

    pub fn with_path(mut self, path: impl fmt::Display) -> Event {
        self.path = Some(path.to_string());
        self
    }

    /// Translates a connection's event for `peer`; `None` for events that only go to logs
    /// (a standby path going up or down).
    pub fn from_conn(time: u64, peer: &str, ev: &ConnEvent) -> Option<Event> {
        let or_none = |p: &Option<crate::conn::PathId>| {
            p.as_ref()
                .map_or_else(|| "none".to_string(), |p| p.to_string())
        };
        let (kind, path, message) = match ev {
            ConnEvent::StateChange { from, to } => {
                (EventType::StateChange, None, format!("{from} -> {to}"))
            }
            ConnEvent::Connected { path } => (
                EventType::Connected,
                Some(path.to_string()),
                format!("connected via {path}"),
            ),
            ConnEvent::Disconnected => (EventType::Disconnected, None, "disconnected".into()),
            ConnEvent::PrimaryChange { from, to, reason } => (
                EventType::PrimaryChange,
                to.as_ref().map(ToString::to_string),
                format!(
                    "primary {} -> {} ({})",
                    or_none(from),
                    or_none(to),
                    reason.as_str()
                ),
            ),
            ConnEvent::Failover { from, to } => (
                EventType::Failover,
                Some(to.to_string()),
                format!("{from} failed; failed over to {to}"),
            ),
            ConnEvent::RelaySwitch { from, to, revert } => (
                EventType::RelaySwitch,
                Some(to.to_string()),
                if *revert {
                    format!("{from} measured slower than {to}; switched back to {to}")
                } else {
                    format!("primary {from} is slow; switched to faster {to}")
                },
            ),
            ConnEvent::Reconnecting { attempt, attempts } => (
                EventType::Reconnecting,
                None,
                match attempts {
                    Some(n) => format!("reconnect attempt {attempt} of {n}"),
                    None => format!("reconnect attempt {attempt}"),
                },
            ),
            ConnEvent::Failed { attempts } => (
                EventType::Error,
                None,
                format!(
                    "no usable path after {attempts} reconnect attempts; waiting for a network \
                     change, a new endpoint or `rally peer reconnect`"
                ),
            ),
            ConnEvent::PathUp { .. } | ConnEvent::PathDown { .. } => return None,
        };
        Some(Event {
            time,
            kind,
            peer: Some(peer.to_string()),
            path,
            message,
        })
    }

    /// A `metrics_update` summarizing a connection.
    pub fn metrics_update(time: u64, peer: &str, m: &ConnMetrics) -> Event {
        let latency = m
            .latency_ms
            .map_or_else(|| "-".to_string(), |l| format!("{l:.1}"));
        let event = Event::new(
            time,
            EventType::MetricsUpdate,
            format!(
                "state={} latency_ms={latency} failovers={} queued={} dropped={}",
                m.state, m.failovers, m.queued, m.queue_dropped
            ),
        )
        .with_peer(peer);
        match &m.primary {
            Some(p) => event.with_path(p),
            None => event,
        }
    }

    /// What a lagging subscriber is shown in place of the events it lost.
    pub fn lagged(time: u64, missed: u64) -> Event {
        Event::new(
            time,
            EventType::Error,
            format!("{missed} events were missed (the reader was too slow)"),
        )
    }

    /// One line of `rally events --json` (without the newline).
    pub fn to_json_line(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl fmt::Display for Event {
    /// `type peer path: message`, leaving out what is absent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(peer) = &self.peer {
            write!(f, " {peer}")?;
        }
        if let Some(path) = &self.path {
            write!(f, " {path}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Which events a subscriber (or a history query) wants. The default wants everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only these types (`None`: all).
    pub types: Option<BTreeSet<EventType>>,
    /// Only events about this peer (`None`: all, including agent-wide ones). The caller
    /// resolves a name, virtual IP or id to the name events carry.
    pub peer: Option<String>,
}

impl EventFilter {
    pub fn all() -> EventFilter {
        EventFilter::default()
    }

    pub fn with_types(mut self, types: impl IntoIterator<Item = EventType>) -> EventFilter {
        self.types = Some(types.into_iter().collect());
        self
    }

    pub fn with_peer(mut self, peer: impl Into<String>) -> EventFilter {
        self.peer = Some(peer.into());
        self
    }

    pub fn matches(&self, ev: &Event) -> bool {
        self.types.as_ref().is_none_or(|t| t.contains(&ev.kind))
            && self
                .peer
                .as_ref()
                .is_none_or(|p| ev.peer.as_ref() == Some(p))
    }
}

/// A subscription's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriberId(u64);

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    /// `missed` events matching the filter were dropped because the subscriber fell behind;
    /// they came before every event that follows.
    Lagged {
        missed: u64,
    },
}

/// The event bus: publish, history, subscribers.
#[derive(Debug)]
pub struct EventBus {
    history: VecDeque<Event>,
    history_len: usize,
    subscribers: BTreeMap<SubscriberId, Subscriber>,
    next_id: u64,
    waker: Waker,
}

/// Called after a publish that gave a subscriber something (see [`EventBus::set_waker`]).
#[derive(Default)]
struct Waker(Option<Box<dyn Fn() + Send + Sync>>);

impl fmt::Debug for Waker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Waker(set)"
        } else {
            "Waker(none)"
        })
    }
}

#[derive(Debug)]
struct Subscriber {
    filter: EventFilter,
    queue: VecDeque<Event>,
    capacity: usize,
    missed: u64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(DEFAULT_HISTORY)
    }
}

impl EventBus {
    /// A bus that keeps the last `history_len` events.
    pub fn new(history_len: usize) -> EventBus {
        EventBus {
            history: VecDeque::with_capacity(history_len.min(1024)),
            history_len,
            subscribers: BTreeMap::new(),
            next_id: 0,
            waker: Waker::default(),
        }
    }

    /// Has `wake` called after every publish that queued an event for a subscriber, so
    /// subscribers can sleep until there is something to read. `wake` must not block (it runs
    /// on the publisher's thread, e.g. the data plane's) and must not touch the bus.
    pub fn set_waker(&mut self, wake: impl Fn() + Send + Sync + 'static) {
        self.waker = Waker(Some(Box::new(wake)));
    }

    /// Records `ev` in the history and hands it to every subscriber whose filter matches.
    /// Never blocks: a full subscriber queue drops its oldest event and counts it.
    pub fn publish(&mut self, ev: Event) {
        let mut queued = false;
        for sub in self.subscribers.values_mut() {
            if !sub.filter.matches(&ev) {
                continue;
            }
            if sub.queue.len() >= sub.capacity {
                sub.missed += 1;
                if sub.queue.pop_front().is_none() {
                    continue; // capacity 0: nothing is ever held
                }
            }
            sub.queue.push_back(ev.clone());
            queued = true;
        }
        if queued {
            if let Some(wake) = &self.waker.0 {
                wake();
            }
        }
        if self.history_len == 0 {
            return;
        }
        if self.history.len() >= self.history_len {
            self.history.pop_front();
        }
        self.history.push_back(ev);
    }

    /// A new subscriber with the default queue length; it sees events published from now on.
    pub fn subscribe(&mut self, filter: EventFilter) -> SubscriberId {
        self.subscribe_with_capacity(filter, DEFAULT_SUBSCRIBER_QUEUE)
    }

    /// A new subscriber that may fall `capacity` events behind before it loses any.
    pub fn subscribe_with_capacity(
        &mut self,
        filter: EventFilter,
        capacity: usize,
    ) -> SubscriberId {
        let id = SubscriberId(self.next_id);
        self.next_id += 1;
        self.subscribers.insert(
            id,
            Subscriber {
                filter,
                queue: VecDeque::new(),
                capacity,
                missed: 0,
            },
        );
        id
    }

    /// Returns false if there was no such subscriber.
    pub fn unsubscribe(&mut self, id: SubscriberId) -> bool {
        self.subscribers.remove(&id).is_some()
    }

    /// Everything the subscriber has not read yet: `Lagged` first if it lost events, then the
    /// events in order. `None` for an unknown subscriber.
    pub fn poll(&mut self, id: SubscriberId) -> Option<Vec<Item>> {
        let sub = self.subscribers.get_mut(&id)?;
        let lagged = (sub.missed > 0).then_some(Item::Lagged { missed: sub.missed });
        sub.missed = 0;
        Some(
            lagged
                .into_iter()
                .chain(sub.queue.drain(..).map(Item::Event))
                .collect(),
        )
    }

    /// Whether the subscriber has anything to read.
    pub fn has_pending(&self, id: SubscriberId) -> bool {
        self.subscribers
            .get(&id)
            .is_some_and(|s| s.missed > 0 || !s.queue.is_empty())
    }

    /// The recent events matching `filter`, oldest first.
    pub fn history(&self, filter: &EventFilter) -> Vec<Event> {
        self.history
            .iter()
            .filter(|e| filter.matches(e))
            .cloned()
            .collect()
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.len()
    }
}

#[cfg(test)]
mod tests;
