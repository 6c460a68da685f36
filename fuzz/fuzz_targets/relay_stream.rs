//! `relay_stream::StreamDecoder` on arbitrary stream bytes, fed in pieces whose sizes come from
//! the first byte: never a panic, every frame it yields is what the stream's length prefixes
//! say, and it never holds more than one frame and one piece.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::relay_stream::{StreamDecoder, MAX_STREAM_FRAME, STREAM_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut d = StreamDecoder::new();
    let mut frames = Vec::new();
    for chunk in stream.chunks(piece) {
        d.extend(chunk);
        while let Some(f) = d.next_frame() {
            frames.push(f.len());
        }
        assert!(d.pending() <= STREAM_HEADER_LEN + MAX_STREAM_FRAME + piece);
    }
    // The same frames as reading the prefixes directly.
    let (mut at, mut expect) = (0, Vec::new());
    while let Some(h) = stream.get(at..at + STREAM_HEADER_LEN) {
        let len = usize::from(u16::from_be_bytes([h[0], h[1]]));
        if stream.len() < at + STREAM_HEADER_LEN + len {
            break;
        }
        expect.push(len);
        at += STREAM_HEADER_LEN + len;
    }
    assert_eq!(frames, expect);
});
