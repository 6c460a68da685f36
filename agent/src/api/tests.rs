//! Pins the JSON the CLI prints (DESIGN.md "JSON shapes"): field names, order and the
//! spelling of every state and strategy, byte for byte.

use std::net::Ipv4Addr;

use rally_proto::control::{NatBehavior, NatReport, PartyInfo, RelayLatency};
use rally_proto::Key32;

use super::*;
use crate::conn::{PathHealth, PathId, PathKind};

fn peer(state: PeerState, strategy: Strategy) -> PeerStatus {
    PeerStatus {
        peer_id: "p2".into(),
        name: "bob".into(),
        virtual_ip: Ipv4Addr::new(10, 66, 0, 6),
        strategy,
        relay: None,
        endpoint: Some("198.51.100.11:51820".parse().unwrap()),
        state,
        latency_ms: Some(0.5),
        bytes_sent: 1,
        bytes_received: 2,
        uptime_seconds: 3,
        is_primary: true,
        priority: 0,
        connected_at: Some(1_700_000_000),
        parties: vec!["lan".into()],
        candidates: vec!["198.51.100.11:51820".parse().unwrap()],
        direct_since_ms: None,
        failovers: 4,
        relay_switches: 5,
        queued: 6,
        queue_dropped: 7,
        paths: vec![PathMetrics {
            path: PathId::Direct("198.51.100.11:51820".parse().unwrap()),
            kind: PathKind::Direct,
            health: PathHealth::Up,
            latency_ms: Some(0.5),
            is_primary: true,
            priority: 0,
            pinned: false,
            consecutive_failures: 0,
            consecutive_successes: 3,
            probes_sent: 10,
            probes_failed: 1,
        }],
        relay_reason: None,
        birthday: None,
        techniques: Vec::new(),
        peer_nat: None,
        path: None,
    }
}

fn mapping() -> PortMappingStatus {
    PortMappingStatus {
        protocol: crate::portmap::Protocol::Pcp,
        external: "198.51.100.7:51820".parse().unwrap(),
        lifetime_s: 7200,
    }
}

fn nat() -> NatReport {
    NatReport {
        udp: true,
        mapping: NatBehavior::EndpointIndependent,
        filtering: NatBehavior::AddressAndPortDependent,
        port_preserving: true,
        public_endpoint: Some("203.0.113.7:51820".parse().unwrap()),
        relays: vec![RelayLatency {
            name: "r1".into(),
            addr: "198.51.100.2:3478".into(),
            latency_ms: Some(1.5),
        }],
        mapped_endpoint: None,
        port_delta: None,
    }
}

#[test]
fn peers_json_is_pinned() {
    let json = serde_json::to_string_pretty(&[peer(PeerState::Connected, Strategy::Direct)]);
    let expected = r#"[
  {
    "peer_id": "p2",
    "name": "bob",
    "virtual_ip": "10.66.0.6",
    "strategy": "direct",
    "relay": null,
    "endpoint": "198.51.100.11:51820",
    "state": "connected",
    "latency_ms": 0.5,
    "bytes_sent": 1,
    "bytes_received": 2,
    "uptime_seconds": 3,
    "is_primary": true,
    "priority": 0,
    "connected_at": 1700000000,
    "parties": [
      "lan"
    ],
    "candidates": [
      "198.51.100.11:51820"
    ],
    "direct_since_ms": null,
    "failovers": 4,
    "relay_switches": 5,
    "queued": 6,
    "queue_dropped": 7,
    "paths": [
      {
        "path": "direct:198.51.100.11:51820",
        "kind": "direct",
        "health": "up",
        "latency_ms": 0.5,
        "is_primary": true,
        "priority": 0,
        "pinned": false,
        "consecutive_failures": 0,
        "consecutive_successes": 3,
        "probes_sent": 10,
        "probes_failed": 1
      }
    ]
  }
]"#;
    assert_eq!(json.unwrap(), expected);
}

#[test]
fn every_state_and_strategy_is_spelled_as_before() {
    let states = [
        (PeerState::Connecting, "connecting"),
        (PeerState::Connected, "connected"),
        (PeerState::Degraded, "degraded"),
        (PeerState::Reconnecting, "reconnecting"),
        (PeerState::Failed, "failed"),
        (PeerState::Disconnected, "disconnected"),
    ];
    for (state, text) in states {
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{text}\"")
        );
        assert_eq!(state.to_string(), text);
        assert_eq!(
            serde_json::from_str::<PeerState>(&format!("\"{text}\"")).unwrap(),
            state
        );
    }
    let strategies = [
        (Strategy::Direct, "direct"),
        (Strategy::Relay, "relay"),
        (Strategy::None, "none"),
    ];
    for (strategy, text) in strategies {
        assert_eq!(
            serde_json::to_string(&strategy).unwrap(),
            format!("\"{text}\"")
        );
        assert_eq!(strategy.to_string(), text);
    }
}

/// `nat` keeps the key order it always had in `rally status --json` (sorted: it used to travel
/// as an untyped JSON value).
#[test]
fn status_json_is_pinned() {
    let owner = Key32([7; 32]);
    let report = StatusReport {
        name: "alice".into(),
        peer_id: "p1".into(),
        virtual_ip: Some(Ipv4Addr::new(10, 66, 0, 5)),
        control: ControlStatus {
            connected: true,
            addr: Some("198.51.100.1:7443".into()),
            error: None,
            transport: None,
        },
        nat: Some(nat()),
        parties: vec![PartyInfo {
            id: "00112233aabbccdd".into(),
            name: "lan".into(),
            owner,
            members: 2,
        }],
        listen_port: 51820,
        port_mapping: Some(mapping()),
    };
    let expected = format!(
        r#"{{
  "name": "alice",
  "peer_id": "p1",
  "virtual_ip": "10.66.0.5",
  "control": {{
    "connected": true,
    "addr": "198.51.100.1:7443",
    "error": null
  }},
  "nat": {{
    "filtering": "address-and-port-dependent",
    "mapping": "endpoint-independent",
    "port_preserving": true,
    "public_endpoint": "203.0.113.7:51820",
    "relays": [
      {{
        "addr": "198.51.100.2:3478",
        "latency_ms": 1.5,
        "name": "r1"
      }}
    ],
    "udp": true
  }},
  "parties": [
    {{
      "id": "00112233aabbccdd",
      "name": "lan",
      "owner": "{owner}",
      "members": 2
    }}
  ],
  "listen_port": 51820,
  "port_mapping": {{
    "protocol": "pcp",
    "external": "198.51.100.7:51820",
    "lifetime_s": 7200
  }}
}}"#
    );
    assert_eq!(serde_json::to_string_pretty(&report).unwrap(), expected);
}

#[test]
fn status_without_a_nat_report_says_null() {
    let report = StatusReport {
        name: "alice".into(),
        peer_id: "p1".into(),
        virtual_ip: None,
        control: ControlStatus {
            connected: false,
            addr: None,
            error: Some("no answer".into()),
            transport: None,
        },
        nat: None,
        parties: vec![],
        listen_port: 0,
        port_mapping: None,
    };
    assert_eq!(
        serde_json::to_string(&report).unwrap(),
        r#"{"name":"alice","peer_id":"p1","virtual_ip":null,"control":{"connected":false,"addr":null,"error":"no answer"},"nat":null,"parties":[],"listen_port":0,"port_mapping":null}"#
    );
}

#[test]
fn netcheck_json_is_pinned() {
    let expected = r#"{
  "udp": true,
  "mapping": "endpoint-independent",
  "filtering": "address-and-port-dependent",
  "port_preserving": true,
  "public_endpoint": "203.0.113.7:51820",
  "relays": [
    {
      "name": "r1",
      "addr": "198.51.100.2:3478",
      "latency_ms": 1.5
    }
  ]
}"#;
    assert_eq!(serde_json::to_string_pretty(&nat()).unwrap(), expected);
}

/// `rally netcheck --json`: the NAT report's fields, then the port mapping (`null`: none);
/// with a mapping the report names its external endpoint too.
#[test]
fn netcheck_reply_json_is_pinned() {
    let none = NetcheckReport {
        nat: nat(),
        port_mapping: None,
        control_transport: None,
        relay_transport: None,
        relay_paths: Vec::new(),
    };
    let text = serde_json::to_string(&none).unwrap();
    assert_eq!(
        text,
        r#"{"udp":true,"mapping":"endpoint-independent","filtering":"address-and-port-dependent","port_preserving":true,"public_endpoint":"203.0.113.7:51820","relays":[{"name":"r1","addr":"198.51.100.2:3478","latency_ms":1.5}],"port_mapping":null}"#
    );
    let mapped = NetcheckReport {
        nat: NatReport {
            mapped_endpoint: Some(mapping().external),
            port_delta: None,
            ..nat()
        },
        port_mapping: Some(mapping()),
        control_transport: None,
        relay_transport: None,
        relay_paths: Vec::new(),
    };
    let text = serde_json::to_string(&mapped).unwrap();
    assert!(
        text.ends_with(
            r#""mapped_endpoint":"198.51.100.7:51820","port_mapping":{"protocol":"pcp","external":"198.51.100.7:51820","lifetime_s":7200}}"#
        ),
        "{text}"
    );
    // Through the socket format and back, inside the tagged reply.
    for report in [none, mapped] {
        let bytes =
            rally_proto::frame::encode(&Ok::<_, String>(IpcReply::Netcheck(report.clone())));
        let back: IpcResult = rally_proto::frame::decode(&bytes).unwrap();
        let Ok(IpcReply::Netcheck(back)) = back else {
            panic!("netcheck reply expected, got {back:?}");
        };
        assert_eq!(back, report);
    }
}

#[test]
fn a_status_from_before_port_mapping_reads_as_none() {
    let text = r#"{"name":"alice","peer_id":"p1","virtual_ip":null,"control":{"connected":false,"addr":null,"error":null},"nat":null,"parties":[],"listen_port":0}"#;
    let report: StatusReport = serde_json::from_str(text).unwrap();
    assert_eq!(report.port_mapping, None);
}

#[test]
fn replies_round_trip_through_the_socket_format() {
    let reply: IpcResult = Ok(IpcReply::Peers {
        peers: vec![peer(PeerState::Reconnecting, Strategy::None)],
    });
    let bytes = rally_proto::frame::encode(&reply);
    let back: IpcResult = rally_proto::frame::decode(&bytes).unwrap();
    let Ok(IpcReply::Peers { peers }) = back else {
        panic!("peers reply expected, got {back:?}");
    };
    assert_eq!(peers[0].state, PeerState::Reconnecting);
    assert_eq!(peers[0].strategy, Strategy::None);
}

#[test]
fn the_path_label_names_the_relay() {
    let mut p = peer(PeerState::Connected, Strategy::Relay);
    p.relay = Some("r1".into());
    assert_eq!(p.path_label(), "relay:r1");
    p.strategy = Strategy::Direct;
    assert_eq!(p.path_label(), "direct");
}

#[test]
fn a_relay_over_tcp_shows_as_relay_tcp_and_keeps_strategy_relay() {
    let mut p = peer(PeerState::Connected, Strategy::Relay);
    p.relay = Some("r1".into());
    p.path = Some("relay-tcp:r1".into());
    assert_eq!(p.path_label(), "relay-tcp:r1");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["strategy"], "relay");
    assert_eq!(json["relay"], "r1");
    assert_eq!(json["path"], "relay-tcp:r1");
}

#[test]
fn peers_resolve_by_name_ip_id_and_unique_prefix() {
    let mut carol = peer(PeerState::Connected, Strategy::Direct);
    carol.name = "carol".into();
    carol.peer_id = "p2x".into();
    carol.virtual_ip = Ipv4Addr::new(10, 66, 0, 7);
    let mut bob = peer(PeerState::Connected, Strategy::Direct);
    bob.peer_id = "abcdef".into();
    let peers = [bob, carol];
    assert_eq!(resolve_peer(&peers, "carol").unwrap().name, "carol");
    assert_eq!(resolve_peer(&peers, "10.66.0.7").unwrap().name, "carol");
    assert_eq!(resolve_peer(&peers, "abcd").unwrap().name, "bob");
    assert!(resolve_peer(&peers, "abc").is_err());
    assert!(resolve_peer(&peers, "zed").is_err());
}

/// `rally discovery --json` and its tagged reply through the socket format.
#[test]
fn discovery_reply_json_is_pinned() {
    use rally_agent_core::discovery::{Counters, DiscoveryStatus, FlowStatus, PeerGroups};
    let status = DiscoveryStatus {
        enabled: true,
        rate_limit: 20,
        blocked_ports: vec![27015],
        blocked_parties: vec!["work".into()],
        local_groups: vec![Ipv4Addr::new(239, 255, 0, 1)],
        peer_groups: vec![PeerGroups {
            peer: "bob".into(),
            groups: vec![Ipv4Addr::new(239, 255, 0, 1)],
        }],
        flows: vec![FlowStatus {
            kind: "broadcast".into(),
            address: Ipv4Addr::BROADCAST,
            port: 4445,
            sent: 3,
            received: 2,
            dropped: 1,
            rate_pps: 1,
            last_sender: Some(Ipv4Addr::new(100, 64, 0, 2)),
            last_seen_ms_ago: 250,
        }],
        counters: Counters {
            forwarded: 3,
            copies_sent: 6,
            delivered: 2,
            dropped_capped: 1,
            ..Counters::default()
        },
    };
    assert_eq!(
        serde_json::to_string(&status).unwrap(),
        r#"{"enabled":true,"rate_limit":20,"blocked_ports":[27015],"blocked_parties":["work"],"local_groups":["239.255.0.1"],"peer_groups":[{"peer":"bob","groups":["239.255.0.1"]}],"flows":[{"kind":"broadcast","address":"255.255.255.255","port":4445,"sent":3,"received":2,"dropped":1,"rate_pps":1,"last_sender":"100.64.0.2","last_seen_ms_ago":250}],"counters":{"forwarded":3,"copies_sent":6,"delivered":2,"dropped_capped":1,"dropped_duplicate":0,"dropped_disabled":0,"dropped_unsubscribed":0,"dropped_malformed":0,"dropped_foreign":0,"subscription_messages":0}}"#
    );
    let reply: IpcResult = Ok(IpcReply::Discovery(Box::new(status.clone())));
    let text = serde_json::to_string(&reply).unwrap();
    assert!(
        text.starts_with(r#"{"Ok":{"reply":"discovery","enabled":true,"#),
        "{text}"
    );
    let back: IpcResult = rally_proto::frame::decode(&rally_proto::frame::encode(&reply)).unwrap();
    let Ok(IpcReply::Discovery(back)) = back else {
        panic!("discovery reply expected, got {back:?}");
    };
    assert_eq!(*back, status);
}

#[test]
fn the_discovery_request_is_spelled_discovery() {
    assert_eq!(
        serde_json::to_string(&IpcRequest::Discovery).unwrap(),
        r#"{"cmd":"discovery"}"#
    );
}

#[test]
fn a_relayed_peer_ends_with_its_relay_reason() {
    let mut p = peer(PeerState::Connected, Strategy::Relay);
    p.relay = Some("r1".into());
    p.paths.clear();
    p.relay_reason = Some("both-symmetric".into());
    let json = serde_json::to_string(&p).unwrap();
    assert!(
        json.ends_with(r#""queue_dropped":7,"paths":[],"relay_reason":"both-symmetric"}"#),
        "{json}"
    );
    let back: PeerStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
}

#[test]
fn a_peers_row_from_before_relay_reason_reads_as_none() {
    let mut p = peer(PeerState::Connected, Strategy::Direct);
    p.relay_reason = Some("x".into());
    let mut v = serde_json::to_value(&p).unwrap();
    v.as_object_mut().unwrap().remove("relay_reason");
    let back: PeerStatus = serde_json::from_value(v).unwrap();
    assert_eq!(back.relay_reason, None);
}

/// The control transport appears in `netcheck --json` and `status --json` once known.
#[test]
fn control_transport_is_reported_when_known() {
    let report = NetcheckReport {
        nat: NatReport {
            udp: false,
            ..nat()
        },
        port_mapping: None,
        control_transport: Some("tcp".into()),
        relay_transport: None,
        relay_paths: Vec::new(),
    };
    let text = serde_json::to_string(&report).unwrap();
    assert!(text.starts_with(r#"{"udp":false,"#), "{text}");
    assert!(
        text.ends_with(r#""port_mapping":null,"control_transport":"tcp"}"#),
        "{text}"
    );
    let back: NetcheckReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, report);
}
