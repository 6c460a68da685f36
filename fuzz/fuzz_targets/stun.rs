//! STUN `BindingRequest::decode` and `BindingResponse::decode` on arbitrary datagrams: whatever
//! decodes survives a re-encode; `response_port` never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::stun::{response_port, BindingRequest, BindingResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = BindingRequest::decode(data) {
        assert_eq!(
            BindingRequest::decode(&req.encode()),
            Ok(req),
            "binding request changed on a round trip"
        );
    }
    let _ = response_port(data);
    if let Ok(resp) = BindingResponse::decode(data) {
        assert_eq!(
            BindingResponse::decode(&resp.encode()),
            Ok(resp),
            "binding response changed on a round trip"
        );
    }
});
