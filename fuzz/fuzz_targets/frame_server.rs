//! Frames carrying `ServerMsg` (control plane → agent): `frame::decode` and `FrameDecoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::ServerMsg;

fuzz_target!(|data: &[u8]| {
    rally_proto_fuzz::check_frames::<ServerMsg>(data);
});
