//! A stream of `ServerMsg` frames fed to the agent's peer-map assembly: `MapPages` (pages of a
//! full map) in front of `PeerView` (versions and deltas), as the agent's control client and
//! daemon use them. Never panics; never holds more than `MAX_MAP_PEERS` peers from pages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::peermap::MAX_MAP_PEERS;
use rally_proto::{FrameDecoder, MapPages, PeerView, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new();
    decoder.extend(data);
    let mut pages = MapPages::new();
    let mut view = PeerView::new();
    while let Ok(Some(msg)) = decoder.next_msg::<ServerMsg>() {
        match msg {
            ServerMsg::PeerPage { version, peers } => {
                let _ = pages.handle_page(version, peers);
            }
            ServerMsg::PeerMap { version, peers } => {
                if let Ok(all) = pages.handle_map(version, peers) {
                    view.handle_full(version, all);
                }
            }
            ServerMsg::PeerDelta { version, changes } => {
                if pages.handle_delta(version).is_ok() {
                    let _ = view.handle_delta(version, changes);
                }
            }
            _ => {}
        }
        assert!(pages.held() <= MAX_MAP_PEERS);
    }
});
