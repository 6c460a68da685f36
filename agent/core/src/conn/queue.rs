//! Packets held for a peer while it has no usable path.

use std::collections::VecDeque;

/// A bounded FIFO of packets. When full, a new packet pushes out the oldest one (fresh packets
/// matter more to games and calls than stale ones), and the drop is counted.
#[derive(Debug, Clone)]
pub struct PacketQueue {
    packets: VecDeque<Vec<u8>>,
    capacity: usize,
    dropped: u64,
}

impl PacketQueue {
    pub fn new(capacity: usize) -> PacketQueue {
        PacketQueue {
            // Allocated on the first push: most peers never queue anything, and a reserved
            // ring of 256 slots is 6 KiB per peer.
            packets: VecDeque::new(),
            capacity,
            dropped: 0,
        }
    }

    /// Appends `packet`; returns the packet dropped to make room, if any (with capacity 0, the
    /// packet itself).
    pub fn push(&mut self, packet: Vec<u8>) -> Option<Vec<u8>> {
        if self.capacity == 0 {
            self.dropped += 1;
            return Some(packet);
        }
        let evicted = if self.packets.len() >= self.capacity {
            self.dropped += 1;
            self.packets.pop_front()
        } else {
            None
        };
        self.packets.push_back(packet);
        evicted
    }

    /// The oldest packet still held.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let packet = self.packets.pop_front();
        if self.packets.is_empty() {
            // Flushed: give the ring back rather than keep it for a peer that may never queue
            // again.
            self.packets = VecDeque::new();
        }
        packet
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Packets dropped because the queue was full, since it was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Forgets every held packet (not counted as dropped); returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.packets.len();
        self.packets.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_evicts_the_oldest_and_counts_it() {
        let mut q = PacketQueue::new(2);
        assert_eq!(q.push(vec![1]), None);
        assert_eq!(q.push(vec![2]), None);
        assert_eq!(q.push(vec![3]), Some(vec![1]));
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.pop(), Some(vec![2]));
        assert_eq!(q.pop(), Some(vec![3]));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_zero_capacity_queue_drops_everything() {
        let mut q = PacketQueue::new(0);
        assert_eq!(q.push(vec![1]), Some(vec![1]));
        assert_eq!((q.len(), q.dropped()), (0, 1));
    }
}
