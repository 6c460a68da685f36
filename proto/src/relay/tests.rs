//! Round trips, refusals and seals of the relay messages.

use super::*;
use proptest::prelude::*;

fn all() -> Vec<RelayMsg<'static>> {
    vec![
        RelayMsg::BindRequest,
        RelayMsg::BindChallenge { cookie: [1; 32] },
        RelayMsg::Bind {
            cookie: [2; 32],
            signature: [3; 64],
            token: &[4; 50],
        },
        RelayMsg::BindOk {
            observed: "203.0.113.5:40000".parse().unwrap(),
            expires_at: 77,
            tag: [8; TAG_LEN],
        },
        RelayMsg::BindOk {
            observed: "[2001:db8::1]:5".parse().unwrap(),
            expires_at: 78,
            tag: [9; TAG_LEN],
        },
        RelayMsg::Send {
            to: [5; 8],
            payload: b"wireguard",
        },
        RelayMsg::Deliver {
            from: [6; 8],
            payload: b"",
        },
        RelayMsg::Ping { nonce: 9 },
        RelayMsg::Pong {
            nonce: 10,
            tag: [1; TAG_LEN],
        },
        RelayMsg::Error {
            code: RelayErrorCode::PeerUnavailable,
            tag: None,
        },
        RelayMsg::Error {
            code: RelayErrorCode::Outdated,
            tag: Some([2; TAG_LEN]),
        },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in all() {
        let b = m.to_vec();
        assert_eq!(RelayMsg::decode(&b), Ok(m));
    }
}

#[test]
fn truncated_and_trailing_are_refused() {
    for m in all() {
        let b = m.to_vec();
        if !matches!(
            m,
            RelayMsg::Send { .. } | RelayMsg::Deliver { .. } | RelayMsg::Bind { .. }
        ) {
            let mut long = b.clone();
            long.push(0);
            assert!(
                RelayMsg::decode(&long).is_err(),
                "{m:?} with a trailing byte"
            );
        }
        if b.len() > HEADER_LEN {
            assert!(
                RelayMsg::decode(&b[..b.len() - 1]).is_err()
                    || matches!(
                        m,
                        RelayMsg::Send { .. } | RelayMsg::Deliver { .. } | RelayMsg::Bind { .. }
                    ),
                "{m:?} truncated"
            );
        }
    }
    assert_eq!(
        RelayMsg::decode(&[0x52, 0x4c, 5, 0, 1]),
        Err(RelayDecodeError::Truncated)
    );
}

#[test]
fn sealed_messages_verify_only_with_their_key() {
    let key = session_key(&[1; 32], &[2; 64]);
    let other = session_key(&[1; 32], &[3; 64]);
    assert_ne!(key, other);
    for m in [
        RelayMsg::BindOk {
            observed: "203.0.113.5:40000".parse().unwrap(),
            expires_at: 77,
            tag: [0; TAG_LEN],
        },
        RelayMsg::Pong {
            nonce: 5,
            tag: [0; TAG_LEN],
        },
        RelayMsg::Error {
            code: RelayErrorCode::NotBound,
            tag: None,
        },
    ] {
        assert!(!m.is_sealed_by(&key), "{m:?} unsealed");
        let b = m.sealed(&key);
        let d = RelayMsg::decode(&b).unwrap();
        assert!(d.is_sealed_by(&key), "{m:?} sealed");
        assert!(!d.is_sealed_by(&other), "{m:?} with another key");
        // Any flipped bit breaks the seal (or the decoding).
        for i in HEADER_LEN..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x40;
            if let Ok(d) = RelayMsg::decode(&x) {
                assert!(!d.is_sealed_by(&key), "{m:?} altered at {i}");
            }
        }
    }
    assert!(!RelayMsg::Ping { nonce: 1 }.is_sealed_by(&key));
}

#[test]
fn the_old_bind_is_recognised_as_outdated() {
    let mut old = RelayMsg::Bind {
        cookie: [2; 32],
        signature: [3; 64],
        token: &[4; 50],
    }
    .to_vec();
    old[2] = 3;
    assert_eq!(RelayMsg::decode(&old), Err(RelayDecodeError::OutdatedBind));
}

#[test]
fn unknown_type_and_foreign_datagrams_are_refused() {
    assert_eq!(
        RelayMsg::decode(&[0x52, 0x4c, 99, 0]),
        Err(RelayDecodeError::UnknownType(99))
    );
    assert_eq!(
        RelayMsg::decode(&[1, 0, 0, 0]),
        Err(RelayDecodeError::NotRelay)
    );
    assert_eq!(
        RelayMsg::decode(&[0x52, 0x4c, 9, 0, 200]),
        Err(RelayDecodeError::BadField)
    );
}

#[test]
fn no_unauthenticated_request_is_amplified() {
    let request = RelayMsg::BindRequest.to_vec();
    let challenge = RelayMsg::BindChallenge { cookie: [0; 32] }.to_vec();
    assert!(request.len() >= challenge.len());
    let ping = RelayMsg::Ping { nonce: 1 }.to_vec();
    let pong = RelayMsg::Pong {
        nonce: 1,
        tag: [0; TAG_LEN],
    }
    .sealed(&[1; 32]);
    assert!(ping.len() >= pong.len());
    assert_eq!(
        RelayMsg::decode(&[0x52, 0x4c, 1, 0]),
        Err(RelayDecodeError::Truncated)
    );
}

#[test]
fn send_becomes_deliver_in_place() {
    let mut b = RelayMsg::Send {
        to: [5; 8],
        payload: b"data",
    }
    .to_vec();
    assert_eq!(send_to_deliver(&mut b, &[7; 8]), Some([5; 8]));
    assert_eq!(
        RelayMsg::decode(&b),
        Ok(RelayMsg::Deliver {
            from: [7; 8],
            payload: b"data"
        })
    );
    assert_eq!(
        send_to_deliver(&mut b, &[7; 8]),
        None,
        "a Deliver is not forwarded again"
    );
}

#[test]
fn send_header_matches_the_encoder() {
    let mut b = vec![0u8; DATA_HEADER_LEN + 3];
    b[DATA_HEADER_LEN..].copy_from_slice(b"abc");
    write_send_header(&mut b, &[1; 8]);
    assert_eq!(
        b,
        RelayMsg::Send {
            to: [1; 8],
            payload: b"abc"
        }
        .to_vec()
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = RelayMsg::decode(&b);
        let _ = send_to_deliver(&mut b, &[0; 8]);
    }
}
