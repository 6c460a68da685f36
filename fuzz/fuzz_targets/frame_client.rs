//! Frames carrying `ClientMsg` (agent → control plane): `frame::decode` and `FrameDecoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::ClientMsg;

fuzz_target!(|data: &[u8]| {
    rally_proto_fuzz::check_frames::<ClientMsg>(data);
});
