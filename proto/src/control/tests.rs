//! Round trips, limits and refusals of the control messages.

use super::*;
use crate::frame;

#[test]
fn every_message_round_trips() {
    let msgs = vec![
        ClientMsg::Hello {
            version: 1,
            identity: Key32([1; 32]),
        },
        ClientMsg::Register {
            name: "alice".into(),
            wg_key: Key32([2; 32]),
            endpoints: vec!["198.51.100.2:51820".parse().unwrap()],
            signature: Sig64([3; 64]),
        },
        ClientMsg::Request {
            id: 1,
            body: Request::CreateParty {
                name: "lan".into(),
                max_uses: Some(3),
                expires_in_secs: None,
            },
        },
        ClientMsg::Request {
            id: 2,
            body: Request::JoinParty { code: "x".into() },
        },
    ];
    for m in msgs {
        assert_eq!(frame::decode::<ClientMsg>(&frame::encode(&m)).unwrap(), m);
    }
    let peer = PeerInfo {
        peer_id: Key32([4; 32]),
        name: "bob".into(),
        wg_key: Key32([5; 32]),
        virtual_ip: Ipv4Addr::new(10, 66, 0, 9),
        endpoints: vec!["198.51.100.3:51820".parse().unwrap()],
        parties: vec!["lan".into()],
        nat: None,
    };
    let server = vec![
        ServerMsg::Response {
            id: 4,
            result: Err(ErrorReply::new(ErrorCode::InviteExpired, "expired")),
        },
        ServerMsg::PeerMap {
            version: 1,
            peers: vec![peer.clone()],
        },
        ServerMsg::PeerDelta {
            version: 2,
            changes: vec![
                PeerChange::Upsert { peer },
                PeerChange::Remove {
                    peer_id: Key32([6; 32]),
                },
            ],
        },
    ];
    for s in server {
        assert_eq!(frame::decode::<ServerMsg>(&frame::encode(&s)).unwrap(), s);
    }
    let sync = ClientMsg::Request {
        id: 5,
        body: Request::SyncPeers,
    };
    assert_eq!(
        frame::decode::<ClientMsg>(&frame::encode(&sync)).unwrap(),
        sync
    );
}

#[test]
fn peer_messages_read_alike_whatever_the_key_order() {
    let peer = r#"{"peer_id":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE","name":"a","wg_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI","virtual_ip":"10.66.0.5","endpoints":["192.0.2.1:5"],"parties":["x"],"nat":null}"#;
    let reordered = r#"{"nat":null,"parties":["x"],"endpoints":["192.0.2.1:5"],"virtual_ip":"10.66.0.5","wg_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI","name":"a","peer_id":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}"#;
    let want: PeerInfo = serde_json::from_str(peer).unwrap();
    let delta = ServerMsg::PeerDelta {
        version: 7,
        changes: vec![
            PeerChange::Upsert { peer: want.clone() },
            PeerChange::Remove {
                peer_id: Key32([3; 32]),
            },
        ],
    };
    let remove = r#"{"op":"remove","peer_id":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM"}"#;
    for text in [
        format!(
            r#"{{"type":"peer_delta","version":7,"changes":[{{"op":"upsert","peer":{peer}}},{remove}]}}"#
        ),
        format!(
            r#"{{"changes":[{{"peer":{reordered},"op":"upsert"}},{{"peer_id":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM","op":"remove"}}],"version":7,"type":"peer_delta"}}"#
        ),
        format!(
            r#"{{"type":"peer_delta","extra":{{"a":[1]}},"changes":[{{"op":"upsert","x":1,"peer":{peer}}},{remove}],"version":7}}"#
        ),
    ] {
        assert_eq!(
            serde_json::from_str::<ServerMsg>(&text).unwrap(),
            delta,
            "{text}"
        );
    }
    let map = format!(r#"{{"peers":[{peer}],"type":"peer_map","version":2}}"#);
    assert_eq!(
        serde_json::from_str::<ServerMsg>(&map).unwrap(),
        ServerMsg::PeerMap {
            version: 2,
            peers: vec![want]
        }
    );
}

#[test]
fn peers_travel_as_arrays_and_nat_only_when_reported() {
    let mut peer = PeerInfo {
        peer_id: Key32([1; 32]),
        name: "a".into(),
        wg_key: Key32([2; 32]),
        virtual_ip: Ipv4Addr::new(10, 66, 0, 5),
        endpoints: vec!["192.0.2.1:5".parse().unwrap()],
        parties: vec!["x".into()],
        nat: None,
    };
    let text = serde_json::to_string(&peer.wire()).unwrap();
    assert_eq!(
        text,
        r#"["AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE","a","AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI","10.66.0.5",["192.0.2.1:5"],["x"]]"#
    );
    assert_eq!(serde_json::from_str::<PeerInfo>(&text).unwrap(), peer);
    peer.nat = Some(NatReport {
        mapping: NatBehavior::EndpointIndependent,
        ..NatReport::default()
    });
    let text = serde_json::to_string(&peer.wire()).unwrap();
    assert_eq!(serde_json::from_str::<PeerInfo>(&text).unwrap(), peer);
    // The cache keeps the object form.
    let object = serde_json::to_string(&peer).unwrap();
    assert!(object.starts_with(r#"{"peer_id":"#));
    assert_eq!(serde_json::from_str::<PeerInfo>(&object).unwrap(), peer);
    let map = ServerMsg::PeerMap {
        version: 1,
        peers: vec![peer],
    };
    let body = serde_json::to_string(&map).unwrap();
    assert!(body.contains(r#""peers":[["#), "{body}");
}

#[test]
fn a_mapped_endpoint_is_optional_on_the_wire() {
    let plain = NatReport::default();
    let text = serde_json::to_string(&plain).unwrap();
    assert!(!text.contains("mapped_endpoint"), "{text}");
    assert_eq!(serde_json::from_str::<NatReport>(&text).unwrap(), plain);
    let mapped = NatReport {
        mapped_endpoint: Some("198.51.100.7:51820".parse().unwrap()),
        port_delta: None,
        ..NatReport::default()
    };
    let text = serde_json::to_string(&mapped).unwrap();
    assert!(
        text.contains(r#""mapped_endpoint":"198.51.100.7:51820""#),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<NatReport>(&text).unwrap(), mapped);
    // Not an IPv4 endpoint: refused.
    let bad = text.replace("198.51.100.7:51820", "[2001:db8::1]:1");
    assert!(serde_json::from_str::<NatReport>(&bad).is_err());
}

#[test]
fn a_port_delta_is_optional_on_the_wire() {
    let plain = NatReport::default();
    assert!(!serde_json::to_string(&plain)
        .unwrap()
        .contains("port_delta"));
    let seq = NatReport {
        port_delta: Some(-2),
        ..NatReport::default()
    };
    let text = serde_json::to_string(&seq).unwrap();
    assert!(text.contains(r#""port_delta":-2"#), "{text}");
    assert_eq!(serde_json::from_str::<NatReport>(&text).unwrap(), seq);
    // Out of range for an i16: refused.
    let bad = text.replace("-2", "70000");
    assert!(serde_json::from_str::<NatReport>(&bad).is_err());
}

#[test]
fn short_or_long_peer_arrays_are_refused() {
    for text in [
        r#"["AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE","a"]"#,
        r#"["AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE","a","AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI","10.66.0.5",[],[],null,1]"#,
    ] {
        assert!(serde_json::from_str::<PeerInfo>(text).is_err(), "{text}");
    }
}

#[test]
fn malformed_peer_messages_are_refused() {
    for text in [
        r#"{"type":"peer_map","version":2}"#,
        r#"{"type":"peer_map","version":2,"peers":[],"peers":[]}"#,
        r#"{"version":2,"type":"peer_map","peers":[],"version":3}"#,
        r#"{"type":"peer_delta","version":2,"changes":[{"op":"upsert"}]}"#,
        r#"{"type":"peer_delta","version":2,"changes":[{"op":"rename","peer_id":"x"}]}"#,
        r#"{"type":"peer_delta","version":-1,"changes":[]}"#,
        r#"{"type":7}"#,
        r#"{}"#,
        r#"[]"#,
    ] {
        assert!(serde_json::from_str::<ServerMsg>(text).is_err(), "{text}");
    }
}

#[test]
fn unknown_message_type_is_refused() {
    let body = br#"{"type":"launch_missiles"}"#;
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    assert!(frame::decode::<ClientMsg>(&f).is_err());
}

#[test]
fn short_signature_is_refused() {
    let body = br#"{"type":"register","name":"a","wg_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","endpoints":[],"signature":"AAAA"}"#;
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    assert!(frame::decode::<ClientMsg>(&f).is_err());
}

#[test]
fn names_are_checked() {
    assert!(validate_name("alice-pc_1.home").is_ok());
    assert_eq!(validate_name(""), Err(ValidationError::Name));
    assert_eq!(validate_name("a b"), Err(ValidationError::Name));
    assert_eq!(validate_name(&"a".repeat(65)), Err(ValidationError::Name));
}

#[test]
fn endpoint_count_is_checked() {
    let e: SocketAddr = "192.0.2.1:1".parse().unwrap();
    assert!(validate_endpoints(&vec![e; MAX_ENDPOINTS]).is_ok());
    assert_eq!(
        validate_endpoints(&vec![e; MAX_ENDPOINTS + 1]),
        Err(ValidationError::TooManyEndpoints)
    );
}
