//! `ClientMsg` frames as the control plane reads them: a decoder limited to
//! `MAX_CLIENT_FRAME_LEN`, then `ClientMsg::validate` (every size and count bounded). Never
//! panics; a message that validates re-encodes within the client frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::control::MAX_CLIENT_FRAME_LEN;
use rally_proto::{frame, ClientMsg, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::with_limit(MAX_CLIENT_FRAME_LEN);
    decoder.extend(data);
    while let Ok(Some(msg)) = decoder.next_msg::<ClientMsg>() {
        if msg.validate().is_ok() {
            assert!(frame::encode(&msg).len() <= 4 + MAX_CLIENT_FRAME_LEN);
        }
    }
});
