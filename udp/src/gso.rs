//! [`GsoBatch`] gathers outgoing datagrams into one buffer for a single UDP GSO send: all to the
//! same destination, all of the same size except a shorter last one (what the kernel's
//! `UDP_SEGMENT` requires). It keeps its buffer between batches: no allocation in steady state.

use std::net::SocketAddr;

/// Most bytes one GSO send carries (the kernel's limit is 64 KiB including headers).
pub const MAX_GSO_BYTES: usize = 60 * 1024;

/// Datagrams waiting for one UDP GSO send.
#[derive(Debug)]
pub struct GsoBatch {
    buf: Vec<u8>,
    dest: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A shorter segment was added: it must be the last.
    closed: bool,
    max_segments: usize,
}

impl GsoBatch {
    /// `max_segments`: what the socket supports (1 means no GSO).
    pub fn new(max_segments: usize) -> Self {
        GsoBatch {
            buf: Vec::with_capacity(MAX_GSO_BYTES + 2048),
            dest: None,
            segment: 0,
            count: 0,
            closed: false,
            max_segments: max_segments.max(1),
        }
    }

    /// Whether `len` bytes to `dest` can join this batch (otherwise flush first).
    pub fn fits(&self, dest: SocketAddr, len: usize) -> bool {
        self.count == 0
            || (self.dest == Some(dest)
                && !self.closed
                && len <= self.segment
                && self.count < self.max_segments
                && self.buf.len() + len <= MAX_GSO_BYTES)
    }

    /// Adds a datagram; the caller checked [`GsoBatch::fits`].
    pub fn push(&mut self, dest: SocketAddr, datagram: &[u8]) {
        debug_assert!(self.fits(dest, datagram.len()));
        if self.count == 0 {
            self.dest = Some(dest);
            self.segment = datagram.len();
        } else if datagram.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    /// What to send: destination, bytes, and the segment size when there are several.
    pub fn pending(&self) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        let dest = self.dest?;
        (self.count > 0).then(|| {
            let seg = (self.count > 1).then_some(self.segment);
            (dest, &self.buf[..], seg)
        })
    }

    /// Empties the batch (keeping its buffer).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.dest = None;
        self.segment = 0;
        self.count = 0;
        self.closed = false;
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], p))
    }

    #[test]
    fn equal_datagrams_to_one_destination_share_a_send() {
        let mut b = GsoBatch::new(64);
        for _ in 0..3 {
            assert!(b.fits(a(1), 100));
            b.push(a(1), &[7; 100]);
        }
        let (dest, bytes, seg) = b.pending().unwrap();
        assert_eq!((dest, bytes.len(), seg), (a(1), 300, Some(100)));
    }

    #[test]
    fn a_shorter_datagram_ends_the_batch() {
        let mut b = GsoBatch::new(64);
        b.push(a(1), &[0; 100]);
        assert!(b.fits(a(1), 60));
        b.push(a(1), &[0; 60]);
        assert!(!b.fits(a(1), 60), "nothing may follow a short segment");
        assert_eq!(b.pending().unwrap().2, Some(100));
    }

    #[test]
    fn another_destination_a_longer_datagram_or_the_limit_needs_a_flush() {
        let mut b = GsoBatch::new(2);
        b.push(a(1), &[0; 100]);
        assert!(!b.fits(a(2), 100));
        assert!(!b.fits(a(1), 101));
        b.push(a(1), &[0; 100]);
        assert!(!b.fits(a(1), 100), "segment limit");
        b.clear();
        assert!(b.is_empty() && b.pending().is_none());
        let mut big = GsoBatch::new(1000);
        while big.fits(a(1), 1452) {
            big.push(a(1), &[0; 1452]);
        }
        assert!(big.pending().unwrap().1.len() <= MAX_GSO_BYTES);
    }

    #[test]
    fn a_single_datagram_has_no_segment_size() {
        let mut b = GsoBatch::new(64);
        b.push(a(1), &[0; 10]);
        assert_eq!(b.pending().unwrap().2, None);
    }
}
