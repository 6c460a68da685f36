//! Relay messages on a byte stream (TLS over TCP): each message is a 2-byte big-endian length
//! followed by that many bytes, exactly the bytes of the UDP datagram it stands for (`Bind`,
//! `Send`, `Deliver`, `Ping`, ...). A frame is never longer than [`MAX_STREAM_FRAME`], so a
//! decoder never holds more than one frame and one read.

/// The TLS exporter label (RFC 8446 §7.5) of the **channel-bound bind** over TCP: both ends
/// export 32 bytes of the connection's keying material under this label (no context), and
/// the agent may use them as the `cookie` of its first `Bind` without asking for a challenge
/// (the relay accepts that value from this connection only, as well as its own cookies).
/// A signature over it cannot be replayed on another connection, and the bind costs one
/// round trip after TLS instead of two.
pub const BIND_EXPORTER_LABEL: &[u8] = b"EXPORTER-rally-relay-bind";

/// Largest relay message (bytes) an agent copies onto both of its TCP connections to a relay,
/// and a relay onto both of an agent's TCP sessions: small datagrams (game state, voice) go
/// twice so that a segment lost on one connection does not hold them back; bulk goes once.
pub const SMALL_FRAME: usize = 300;

/// Whether a `Send` or `Deliver` (they share one layout) is copied onto both TCP connections:
/// at most [`SMALL_FRAME`] bytes carrying a WireGuard data message (type 4), whose second copy
/// WireGuard's replay window refuses before decrypting. Handshakes and the agents' own probes
/// go once: a second handshake message would be refused as a replay too, but counted as an
/// error, and a probe would be answered twice.
pub fn is_copied(msg: &[u8]) -> bool {
    let at = crate::relay::DATA_HEADER_LEN;
    msg.len() <= SMALL_FRAME && msg.get(at..at + 4) == Some(&[4, 0, 0, 0][..])
}

/// Longest frame body: the largest UDP payload, which a 2-byte length can say.
pub const MAX_STREAM_FRAME: usize = u16::MAX as usize;
/// Bytes of the length prefix.
pub const STREAM_HEADER_LEN: usize = 2;

/// A message too long for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a relay message of {0} bytes does not fit in one stream frame")]
pub struct FrameTooLong(pub usize);

/// Appends `msg` as one frame to `out`.
pub fn write_frame(out: &mut Vec<u8>, msg: &[u8]) -> Result<(), FrameTooLong> {
    let len = u16::try_from(msg.len()).map_err(|_| FrameTooLong(msg.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Ok(())
}

/// Accumulates stream bytes and yields whole frames. Holds at most one partial frame plus
/// what was last given to [`StreamDecoder::extend`].
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf` (everything before it was handed out).
    start: usize,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream (dropping the frames already handed out).
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's body, `None` if more bytes are needed. The body is mutable so a
    /// relay can rewrite it in place (`Send` into `Deliver`).
    pub fn next_frame(&mut self) -> Option<&mut [u8]> {
        let rest = self.buf.get(self.start..)?;
        let head = rest.get(..STREAM_HEADER_LEN)?;
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        if rest.len() < STREAM_HEADER_LEN + len {
            return None;
        }
        let body = self.start + STREAM_HEADER_LEN;
        self.start = body + len;
        self.buf.get_mut(body..body + len)
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_message_longer_than_a_frame_is_refused() {
        let mut out = Vec::new();
        assert_eq!(
            write_frame(&mut out, &vec![0; MAX_STREAM_FRAME + 1]),
            Err(FrameTooLong(MAX_STREAM_FRAME + 1))
        );
        assert!(out.is_empty());
        assert!(write_frame(&mut out, &vec![7; MAX_STREAM_FRAME]).is_ok());
    }

    proptest! {
        #[test]
        fn frames_split_anywhere_come_out_whole_and_in_order(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cut in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                write_frame(&mut stream, m).unwrap();
            }
            let mut d = StreamDecoder::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                d.extend(chunk);
                while let Some(f) = d.next_frame() {
                    got.push(f.to_vec());
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = StreamDecoder::new();
            for chunk in b.chunks(97) {
                d.extend(chunk);
                while d.next_frame().is_some() {}
                prop_assert!(d.pending() <= STREAM_HEADER_LEN + MAX_STREAM_FRAME + 97);
            }
        }
    }
}
