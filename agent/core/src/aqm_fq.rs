//! Flow queues for bulk packets (fq-codel style, RFC 8290), sans-IO.
//!
//! Bulk packets are hashed by flow (the inner 5-tuple on the send side: [`flow_key`]) into a
//! fixed number of queues ([`FLOW_QUEUES`]); a deficit round robin serves the queues that hold
//! packets, a quantum of bytes each per round, and each queue has its own [`Codel`]. When the
//! byte limit shared by all queues is reached, the head of the **fattest** queue is dropped:
//! the flow that built the queue backs off, not every flow at once (one shared FIFO dropped
//! its oldest packets, whichever flows they belonged to, and four TCP streams halved together).
//! Memory is bounded: a fixed array of queues, a byte limit over all of them, and a queue's
//! ring is shrunk when it empties.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::aqm::Codel;

/// Flow queues per direction: enough that a handful of bulk flows rarely share one.
pub const FLOW_QUEUES: usize = 64;
/// Bytes a flow queue may send per round of the deficit round robin (one full-size packet
/// with its link header, as fq-codel's default).
pub const QUANTUM: usize = 1514;
/// A queue's ring keeps at most this many slots once it is empty.
const KEEP_SLOTS: usize = 64;

/// One flow queue: its packets, its deficit and its CoDel state.
#[derive(Debug)]
struct Flow<T> {
    items: VecDeque<(T, usize, Instant)>,
    bytes: usize,
    deficit: i64,
    active: bool,
    codel: Codel,
}

/// What [`FlowQueues::pop`] hands out.
#[derive(Debug, PartialEq, Eq)]
pub struct Dequeued<T> {
    pub item: T,
    /// How long it waited.
    pub sojourn: Duration,
    /// Its flow's CoDel picked it: mark it Congestion Experienced, or drop it.
    pub congested: bool,
}

/// Bulk items in per-flow queues under a shared byte limit, served by deficit round robin,
/// CoDel per flow.
#[derive(Debug)]
pub struct FlowQueues<T> {
    flows: Vec<Flow<T>>,
    /// Indexes of the queues holding items, in round-robin order.
    active: VecDeque<usize>,
    bytes: usize,
    len: usize,
    limit: usize,
    quantum: i64,
}

impl<T> FlowQueues<T> {
    /// [`FLOW_QUEUES`] empty queues holding at most `limit_bytes` together (always at least
    /// one item), each sending `quantum` bytes per round.
    pub fn new(limit_bytes: usize, quantum: usize, codel: Codel) -> Self {
        let flows = (0..FLOW_QUEUES)
            .map(|_| Flow {
                items: VecDeque::new(),
                bytes: 0,
                deficit: 0,
                active: false,
                codel: codel.clone(),
            })
            .collect();
        FlowQueues {
            flows,
            active: VecDeque::with_capacity(FLOW_QUEUES),
            bytes: 0,
            len: 0,
            limit: limit_bytes,
            quantum: i64::try_from(quantum.max(1)).unwrap_or(i64::MAX),
        }
    }

    /// Appends `item` of `len` bytes arrived at `now` to the queue of flow `key`. Returns the
    /// items dropped to make room: heads of the fattest queue.
    pub fn push(&mut self, key: u64, item: T, len: usize, now: Instant) -> Vec<T> {
        let mut dropped = Vec::new();
        while self.len > 0 && self.bytes + len > self.limit {
            match self.drop_from_fattest() {
                Some(old) => dropped.push(old),
                None => break,
            }
        }
        let i = (key % FLOW_QUEUES as u64) as usize;
        let f = &mut self.flows[i];
        f.items.push_back((item, len, now));
        f.bytes += len;
        if !f.active {
            f.active = true;
            f.deficit = self.quantum;
            self.active.push_back(i);
        }
        self.bytes += len;
        self.len += 1;
        dropped
    }

    /// The next item in deficit round robin order, with its sojourn and its flow's CoDel
    /// verdict.
    pub fn pop(&mut self, now: Instant) -> Option<Dequeued<T>> {
        loop {
            let &i = self.active.front()?;
            let f = &mut self.flows[i];
            if f.items.is_empty() {
                self.deactivate(i);
                continue;
            }
            if f.deficit <= 0 {
                // The rest of its share waits for the next round.
                f.deficit += self.quantum;
                self.active.rotate_left(1);
                continue;
            }
            let (item, len, at) = f.items.pop_front()?;
            f.bytes -= len;
            f.deficit -= i64::try_from(len).unwrap_or(i64::MAX);
            let sojourn = now.saturating_duration_since(at);
            let congested = f.codel.should_drop(sojourn, f.bytes, now);
            self.bytes -= len;
            self.len -= 1;
            if f.items.is_empty() {
                self.deactivate(i);
            }
            return Some(Dequeued {
                item,
                sojourn,
                congested,
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items queued in all flows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes queued in all flows.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Flows holding items.
    pub fn active_flows(&self) -> usize {
        self.active.len()
    }

    fn deactivate(&mut self, i: usize) {
        if self.active.front() == Some(&i) {
            self.active.pop_front();
        } else if let Some(pos) = self.active.iter().position(|&j| j == i) {
            self.active.remove(pos);
        }
        let f = &mut self.flows[i];
        f.active = false;
        f.deficit = 0;
        if f.items.is_empty() && f.items.capacity() > KEEP_SLOTS {
            f.items.shrink_to(KEEP_SLOTS);
        }
    }

    fn drop_from_fattest(&mut self) -> Option<T> {
        let i = (0..self.flows.len()).max_by_key(|&i| self.flows[i].bytes)?;
        let f = &mut self.flows[i];
        let (item, len, _) = f.items.pop_front()?;
        f.bytes -= len;
        self.bytes -= len;
        self.len -= 1;
        if f.items.is_empty() {
            self.deactivate(i);
        }
        Some(item)
    }
}

/// The flow of an IP packet: a hash of its protocol, addresses and (TCP, UDP) ports; 0 for
/// what is not IPv4 or IPv6. Fragments other than the first hash without ports.
pub fn flow_key(packet: &[u8]) -> u64 {
    let (proto, addrs, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([packet[6] & 0x1f, packet[7]]);
            let l4 = if frag_offset == 0 { ihl } else { usize::MAX };
            (packet[9], &packet[12..20], l4)
        }
        Some(6) if packet.len() >= 40 => (packet[6], &packet[8..40], 40),
        _ => return 0,
    };
    let mut h = Fnv::default();
    h.write(&[proto]);
    h.write(addrs);
    if matches!(proto, 6 | 17) {
        if let Some(ports) = packet.get(l4..l4.saturating_add(4)) {
            h.write(ports);
        }
    }
    h.0
}

/// FNV-1a, 64 bits: a few dozen bytes per packet, no seed needed (the hash only spreads flows
/// over queues; a sender who collides flows on purpose only shares its own flows' queue).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
#[path = "aqm_fq_tests.rs"]
mod tests;
