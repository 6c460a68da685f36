//! Batching for the packet path.
//!
//! GSO batches for UDP sends live in `rally_udp` (shared with the relay). [`TunBatch`] gathers
//! decrypted packets, with the virtio-net header room tun-rs needs in front of each, for one
//! `send_multiple` (which coalesces TCP segments back into large packets when the device has
//! offload). It keeps its buffers between batches: no allocation in steady state.

pub use rally_udp::{GsoBatch, MAX_GSO_BYTES};

/// Packets waiting for one write to the TUN device.
#[derive(Debug)]
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    count: usize,
    offset: usize,
}

impl TunBatch {
    /// `batch`: packets per write; `offset`: room for the virtio-net header before each.
    pub fn new(batch: usize, offset: usize) -> Self {
        TunBatch {
            bufs: (0..batch.max(1))
                .map(|_| Vec::with_capacity(offset + 65_536))
                .collect(),
            count: 0,
            offset,
        }
    }

    /// Adds a packet; returns true when the batch is full and must be written.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        let b = &mut self.bufs[self.count];
        b.clear();
        b.resize(self.offset, 0);
        b.extend_from_slice(packet);
        self.count += 1;
        self.count == self.bufs.len()
    }

    /// The buffers to write (each: header room, then the packet) and the header room.
    pub fn pending(&mut self) -> (&mut [Vec<u8>], usize) {
        (&mut self.bufs[..self.count], self.offset)
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_batch_leaves_header_room_and_reports_full() {
        let mut t = TunBatch::new(2, 10);
        assert!(!t.push(b"abc"));
        assert!(t.push(b"de"));
        let (bufs, offset) = t.pending();
        assert_eq!(offset, 10);
        assert_eq!(&bufs[0][10..], b"abc");
        assert_eq!(&bufs[1][10..], b"de");
        t.clear();
        assert!(t.is_empty());
    }
}
