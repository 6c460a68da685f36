//! `RelayMsg::decode` on arbitrary datagrams: every accepted message re-encodes to exactly the
//! same bytes, sealing it makes a message that verifies with the sealing key only (for the
//! kinds that are sealed: `BindOk`, `Pong`, `Error`), and `send_to_deliver` rewrites exactly
//! the `Send`s.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rally_proto::relay::{send_to_deliver, RelayMsg};

const FROM: [u8; 8] = [0xab; 8];
const KEY: [u8; 32] = [0x5e; 32];

fuzz_target!(|data: &[u8]| {
    let decoded = RelayMsg::decode(data);
    if let Ok(m) = &decoded {
        let enc = m.to_vec();
        // The encoding is canonical: an accepted datagram is exactly what `encode` writes.
        assert_eq!(enc, data, "accepted a non-canonical relay message {m:?}");
        assert_eq!(&RelayMsg::decode(&enc), &decoded, "changed on a round trip");
        let _ = m.is_sealed_by(&KEY);
        let sealed = m.sealed(&KEY);
        let sealable = matches!(
            m,
            RelayMsg::BindOk { .. } | RelayMsg::Pong { .. } | RelayMsg::Error { .. }
        );
        match RelayMsg::decode(&sealed) {
            Ok(s) => {
                assert_eq!(s.is_sealed_by(&KEY), sealable, "sealing {m:?}");
                assert!(
                    !s.is_sealed_by(&[0x5f; 32]),
                    "sealed {m:?} verifies with another key"
                );
            }
            Err(e) => panic!("sealed {m:?} does not decode: {e:?}"),
        }
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
