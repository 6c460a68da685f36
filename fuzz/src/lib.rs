//! Checks shared by the fuzz targets.

use std::fmt::Debug;

use rally_proto::frame::{self, FrameDecoder};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A control-channel message type, as far as the frame checks need it.
pub trait Msg: Serialize + DeserializeOwned + PartialEq + Debug {}
impl<T: Serialize + DeserializeOwned + PartialEq + Debug> Msg for T {}

/// Asserts that `m` survives `frame::encode` → `frame::decode` unchanged, and that its encoding
/// is a fixed point.
pub fn assert_frame_round_trip<T: Msg>(m: &T) {
    let enc = frame::encode(m);
    let back = match frame::decode::<T>(&enc) {
        Ok(back) => back,
        Err(e) => panic!(
            "re-encoded message does not decode: {e}\nmessage: {m:?}\nbody: {}",
            String::from_utf8_lossy(&enc[4..])
        ),
    };
    assert_eq!(&back, m, "message changed on a round trip");
    assert_eq!(frame::encode(&back), enc, "encoding is not a fixed point");
}

/// Fuzzes the frame codec for one message type.
///
/// Input: one byte that picks how to split the stream, then the stream itself. The stream is read
/// three ways, which must agree:
/// - `frame::decode` of the whole stream as one frame;
/// - a reference walk over the whole buffer with `frame::decode_prefix`;
/// - a `FrameDecoder` fed the stream in chunks chosen by the split byte, drained after each chunk.
///
/// Every message that decodes must survive a re-encode.
pub fn check_frames<T: Msg>(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };

    let whole = frame::decode::<T>(stream);
    let reference = Walk::<T>::over(stream);
    let exactly_one = reference.msgs.len() == 1 && reference.rest.is_empty() && !reference.failed;
    match &whole {
        Ok(m) => {
            assert!(
                exactly_one,
                "decode accepted a stream that is not exactly one frame"
            );
            assert_eq!(&reference.msgs[0], m);
        }
        Err(_) => assert!(
            !exactly_one,
            "decode refused a stream of exactly one good frame"
        ),
    }

    let (got, failed, dec) = feed_in_chunks::<T>(stream, split);
    assert_eq!(
        failed, reference.failed,
        "FrameDecoder and decode_prefix disagree on whether the stream is bad"
    );
    assert_eq!(
        got, reference.msgs,
        "FrameDecoder yielded different messages"
    );
    if !failed {
        assert_eq!(
            dec.pending(),
            reference.rest.len(),
            "FrameDecoder holds the wrong leftover"
        );
        assert_eq!(
            dec.finish().is_some(),
            !reference.rest.is_empty(),
            "FrameDecoder::finish disagrees with the leftover"
        );
    }

    for m in &got {
        assert_frame_round_trip(m);
    }
}

/// The reference reading of a stream: every complete frame at the front of the buffer, up to
/// the first error.
struct Walk<'a, T> {
    /// The frames decoded, in order.
    msgs: Vec<T>,
    /// The bytes after the last decoded frame.
    rest: &'a [u8],
    /// Whether the walk stopped at a bad frame (rather than at an incomplete one).
    failed: bool,
}

impl<'a, T: Msg> Walk<'a, T> {
    fn over(stream: &'a [u8]) -> Self {
        let mut walk = Walk {
            msgs: Vec::new(),
            rest: stream,
            failed: false,
        };
        loop {
            match frame::decode_prefix::<T>(walk.rest) {
                Ok(Some((m, used))) => {
                    assert!(
                        (4..=walk.rest.len()).contains(&used),
                        "decode_prefix used {used} of {} bytes",
                        walk.rest.len()
                    );
                    walk.msgs.push(m);
                    walk.rest = &walk.rest[used..];
                }
                Ok(None) => return walk,
                Err(_) => {
                    walk.failed = true;
                    return walk;
                }
            }
        }
    }
}

/// Feeds `stream` to a `FrameDecoder` in chunks chosen by `split`, draining it after each
/// chunk. Returns the messages it yielded, whether it failed, and the decoder.
fn feed_in_chunks<T: Msg>(stream: &[u8], split: u8) -> (Vec<T>, bool, FrameDecoder) {
    let mut chunks = Chunker::new(split);
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = chunks.next(stream.len() - pos);
        dec.extend(&stream[pos..pos + n]);
        pos += n;
        loop {
            match dec.next_msg::<T>() {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(_) => return (got, true, dec),
            }
        }
    }
    (got, false, dec)
}

/// Chunk sizes from the split byte: 0 feeds everything at once, 1 one byte at a time, anything
/// else pseudo-random sizes in 1..=64.
struct Chunker {
    mode: u8,
    state: u32,
}

impl Chunker {
    fn new(split: u8) -> Self {
        Chunker {
            mode: split,
            state: u32::from(split).wrapping_mul(0x9E37_79B9) | 1,
        }
    }

    fn next(&mut self, left: usize) -> usize {
        let n = match self.mode {
            0 => left,
            1 => 1,
            _ => {
                // xorshift32
                self.state ^= self.state << 13;
                self.state ^= self.state >> 17;
                self.state ^= self.state << 5;
                1 + (self.state % 64) as usize
            }
        };
        n.min(left)
    }
}
