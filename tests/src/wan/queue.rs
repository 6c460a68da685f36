//! A ring of fixed frame slots held for one direction, first in first out.

use std::time::Instant;

use super::control::{is_far, Counters};
use super::sys::{Batch, PacketSocket};
use super::thread::{Arrival, SplitMix64};
use super::{BATCH, BATCHES_PER_WAKE, SLOT};

/// Frames held for one direction: a ring of fixed slots, first in first out.
pub(super) struct Queue {
    buf: Vec<u8>,
    pub(super) len: Vec<u16>,
    pub(super) due: Vec<Instant>,
    pub(super) head: usize,
    count: usize,
}

impl Queue {
    pub(super) fn new(frames: usize) -> Queue {
        // Zeroed memory is mapped lazily, and the ring restarts at slot 0 whenever it empties,
        // so an idle uplink only ever touches its first few slots.
        Queue {
            buf: vec![0; frames * SLOT],
            len: vec![0; frames],
            due: vec![Instant::now(); frames],
            head: 0,
            count: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.len.len()
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        (self.count > 0).then(|| self.due[self.head])
    }

    /// Reads what `sock` has (a few batches at most) into free slots; drops what the loss
    /// setting or a full queue says to drop.
    pub(super) fn receive(
        &mut self,
        sock: &PacketSocket,
        arrival: Arrival,
        rng: &mut SplitMix64,
        counters: &Counters,
        io: &mut Batch,
        far: &mut Queue,
    ) {
        for _ in 0..BATCHES_PER_WAKE {
            let cap = self.capacity();
            let tail = (self.head + self.count) % cap;
            let free = cap - self.count;
            let room = free.min(cap - tail).min(BATCH);
            let wanted = if room == 0 { BATCH } else { room };
            let received = if room == 0 {
                // Full: read into one scratch slot and discard, so the socket does not stay
                // readable and the loop does not spin.
                let n = io.recv_scratch(sock.fd());
                Counters::add(&counters.overflowed, n);
                n
            } else {
                let base = self.buf[tail * SLOT..].as_mut_ptr();
                let n = io.recv(sock.fd(), base, room);
                let mut kept = 0;
                let (mut lost, mut malformed) = (0, 0);
                for i in 0..n {
                    let (len, truncated, outgoing) = io.received(i);
                    if outgoing {
                        continue;
                    }
                    if truncated || len < 14 {
                        malformed += 1;
                        continue;
                    }
                    if u64::from(rng.next_u32()) < arrival.loss {
                        lost += 1;
                        continue;
                    }
                    let frame = &self.buf[(tail + i) * SLOT..(tail + i) * SLOT + len];
                    if is_far(frame, &arrival.far) {
                        if !far.push(frame, arrival.far_due) {
                            Counters::add(&counters.overflowed, 1);
                        }
                        continue;
                    }
                    let (from, to) = (tail + i, tail + kept);
                    if from != to {
                        self.buf
                            .copy_within(from * SLOT..from * SLOT + len, to * SLOT);
                    }
                    self.len[to] = len as u16;
                    self.due[to] = arrival.due;
                    kept += 1;
                }
                self.count += kept;
                Counters::add(&counters.lost, lost);
                Counters::add(&counters.malformed, malformed);
                n
            };
            if received < wanted {
                return;
            }
        }
    }

    /// Copies `frame` into the tail slot, due at `due`; false if the ring is full.
    pub(super) fn push(&mut self, frame: &[u8], due: Instant) -> bool {
        let cap = self.capacity();
        if self.count == cap {
            return false;
        }
        let tail = (self.head + self.count) % cap;
        self.buf[tail * SLOT..tail * SLOT + frame.len()].copy_from_slice(frame);
        self.len[tail] = frame.len() as u16;
        self.due[tail] = due;
        self.count += 1;
        true
    }

    /// Sends every frame that is due to `sock`.
    pub(super) fn release(
        &mut self,
        now: Instant,
        sock: &PacketSocket,
        counters: &Counters,
        io: &mut Batch,
    ) {
        while self.count > 0 && self.due[self.head] <= now {
            let cap = self.capacity();
            let limit = self.count.min(cap - self.head).min(BATCH);
            let mut n = 1;
            while n < limit && self.due[self.head + n] <= now {
                n += 1;
            }
            let sent = io.send(sock.fd(), &self.buf, &self.len, self.head, n);
            let advanced = match sent {
                Ok(sent) => {
                    Counters::add(&counters.forwarded, sent);
                    sent
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(_) => {
                    // Refused by the far end (backlog full, device down): that frame is lost.
                    Counters::add(&counters.refused, 1);
                    1
                }
            };
            self.head = (self.head + advanced) % cap;
            self.count -= advanced;
        }
        if self.count == 0 {
            self.head = 0;
        }
    }
}
