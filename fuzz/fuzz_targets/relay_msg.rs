//! `RelayMsg::decode` on arbitrary datagrams: every accepted message re-encodes to exactly the
//! same bytes, and `send_to_deliver` rewrites exactly the `Send`s.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::relay::{send_to_deliver, RelayMsg};

const FROM: [u8; 8] = [0xab; 8];

fuzz_target!(|data: &[u8]| {
    let decoded = RelayMsg::decode(data);
    if let Ok(m) = &decoded {
        let enc = m.to_vec();
        // The encoding is canonical: an accepted datagram is exactly what `encode` writes.
        assert_eq!(enc, data, "accepted a non-canonical relay message {m:?}");
        assert_eq!(&RelayMsg::decode(&enc), &decoded, "changed on a round trip");
    }

    let mut rewritten = data.to_vec();
    match (send_to_deliver(&mut rewritten, &FROM), &decoded) {
        (Some(to), Ok(RelayMsg::Send { to: want, payload })) => {
            assert_eq!(&to, want, "send_to_deliver read the wrong destination");
            assert_eq!(
                RelayMsg::decode(&rewritten),
                Ok(RelayMsg::Deliver {
                    from: FROM,
                    payload
                }),
                "a Send did not become the same-length Deliver"
            );
        }
        (None, Ok(RelayMsg::Send { .. })) => panic!("send_to_deliver refused a Send"),
        (Some(_), other) => panic!("send_to_deliver rewrote a non-Send: {other:?}"),
        (None, _) => assert_eq!(rewritten, data, "send_to_deliver touched a non-Send"),
    }
});
