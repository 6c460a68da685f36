//! Length-prefixed frames on a byte stream: a 4-byte big-endian length, then that many bytes of
//! JSON. Used on the control plane's QUIC streams and the agent's local control socket.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body accepted (a peer map of a few thousand peers fits well inside).
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    Oversized(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0; 4];
    // Serializing our own message types to a Vec cannot fail: no maps with non-string keys.
    serde_json::to_writer(&mut out, msg).expect("message types serialize infallibly");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decodes exactly one frame that fills `buf`.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = decode_prefix(buf)?.ok_or(FrameError::Truncated {
        need: 4,
        have: buf.len(),
    })?;
    if used != buf.len() {
        return Err(FrameError::Malformed(serde::de::Error::custom(
            "trailing bytes after frame",
        )));
    }
    Ok(msg)
}

/// Decodes the first frame in `buf` if it is complete: `Ok(None)` when more bytes are needed,
/// otherwise the message and how many bytes it used.
pub fn decode_prefix<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    decode_prefix_within(buf, MAX_FRAME_LEN)
}

/// [`decode_prefix`] with a smaller limit on the body length.
pub fn decode_prefix_within<T: DeserializeOwned>(
    buf: &[u8],
    limit: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = body_len_within(buf, limit)? else {
        return Ok(None);
    };
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[4..4 + len])?;
    Ok(Some((msg, 4 + len)))
}

/// The declared body length, checked against the limit, once four bytes are there.
pub fn body_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    body_len_within(buf, MAX_FRAME_LEN)
}

fn body_len_within(buf: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > limit.min(MAX_FRAME_LEN) {
        return Err(FrameError::Oversized(len, limit.min(MAX_FRAME_LEN)));
    }
    Ok(Some(len))
}

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder for frames up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_limit(MAX_FRAME_LEN)
    }

    /// A decoder that refuses a frame whose declared body exceeds `limit` bytes (at most
    /// [`MAX_FRAME_LEN`]) as soon as its length prefix arrives, before buffering the body.
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            limit: limit.min(MAX_FRAME_LEN),
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is out of step and must be closed.
    pub fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match decode_prefix_within(&self.buf, self.limit)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// If the stream ended now, the error for what is left over (`None` if nothing is).
    pub fn finish(&self) -> Option<FrameError> {
        let need = match body_len_within(&self.buf, self.limit) {
            Err(e) => return Some(e),
            Ok(Some(len)) => 4 + len,
            Ok(None) => 4,
        };
        (!self.buf.is_empty()).then_some(FrameError::Truncated {
            need,
            have: self.buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClientMsg, Request};
    use proptest::prelude::*;

    fn sample() -> ClientMsg {
        ClientMsg::Request {
            id: 7,
            body: Request::ListParties,
        }
    }

    #[test]
    fn round_trips() {
        let f = encode(&sample());
        assert_eq!(decode::<ClientMsg>(&f).unwrap(), sample());
    }

    #[test]
    fn truncated_frame_is_refused() {
        let f = encode(&sample());
        assert!(matches!(
            decode::<ClientMsg>(&f[..f.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode::<ClientMsg>(&f[..2]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let head = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode::<ClientMsg>(&head),
            Err(FrameError::Oversized(..))
        ));
        let mut d = FrameDecoder::new();
        d.extend(&head);
        assert!(matches!(
            d.next_msg::<ClientMsg>(),
            Err(FrameError::Oversized(..))
        ));
    }

    #[test]
    fn a_decoder_with_a_limit_refuses_a_larger_frame_from_its_prefix() {
        let mut d = FrameDecoder::with_limit(100);
        d.extend(&101u32.to_be_bytes());
        assert!(matches!(
            d.next_msg::<ClientMsg>(),
            Err(FrameError::Oversized(101, 100))
        ));
        let mut d = FrameDecoder::with_limit(1000);
        d.extend(&encode(&sample()));
        assert_eq!(d.next_msg::<ClientMsg>().unwrap(), Some(sample()));
    }

    #[test]
    fn malformed_body_is_refused() {
        let mut f = 5u32.to_be_bytes().to_vec();
        f.extend_from_slice(b"{nope");
        assert!(matches!(
            decode::<ClientMsg>(&f),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut f = encode(&sample());
        f.push(0);
        assert!(matches!(
            decode::<ClientMsg>(&f),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn decoder_yields_frames_split_anywhere() {
        let mut all = encode(&sample());
        all.extend(encode(&ClientMsg::Request {
            id: 8,
            body: Request::ListParties,
        }));
        let mut d = FrameDecoder::new();
        let mut got = vec![];
        for b in all.chunks(3) {
            d.extend(b);
            while let Some(m) = d.next_msg::<ClientMsg>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(d.finish().is_none());
    }

    #[test]
    fn decoder_reports_a_partial_frame_at_end() {
        let f = encode(&sample());
        let mut d = FrameDecoder::new();
        d.extend(&f[..f.len() - 2]);
        assert!(d.next_msg::<ClientMsg>().unwrap().is_none());
        assert!(matches!(d.finish(), Some(FrameError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ClientMsg>(&b);
            let _ = decode::<crate::control::ServerMsg>(&b);
            let mut d = FrameDecoder::with_limit(crate::control::MAX_CLIENT_FRAME_LEN);
            d.extend(&b);
            while let Ok(Some(m)) = d.next_msg::<ClientMsg>() {
                let _ = m.validate();
            }
        }
    }
}
