//! STUN answers: the source address, the other port, RESPONSE-PORT.

use super::*;

#[test]
fn stun_request_is_answered_with_the_source_address() {
    let mut lab = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [7; 12],
        change_ip: false,
        change_port: false,
    }
    .encode();

    let (action, _) = lab.recv(src, &req);

    let Action::Reply(t) = action else {
        panic!("{action:?}")
    };
    assert_eq!((t.via, t.to), (Via::Primary, src));
    assert_eq!(
        BindingResponse::decode(&t.payload),
        Ok(BindingResponse {
            txid: [7; 12],
            mapped: src,
            origin: Some(lab.relay.config().local),
            other: lab.relay.config().alt,
        })
    );
    assert_eq!(lab.relay.stats().stun_requests, 1);
}

#[test]
fn stun_change_port_is_answered_from_the_other_port() {
    let mut lab = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [7; 12],
        change_ip: false,
        change_port: true,
    }
    .encode();
    let (local, alt) = (lab.relay.config().local, lab.relay.config().alt);

    let from_primary = lab.recv(src, &req).0;
    let from_alt = lab.recv_via(Via::Alt, src, &req).0;

    let Action::Reply(t) = from_primary else {
        panic!("{from_primary:?}")
    };
    assert_eq!(t.via, Via::Alt);
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!((resp.origin, resp.other), (alt, alt));
    let Action::Reply(t) = from_alt else {
        panic!("{from_alt:?}")
    };
    assert_eq!(t.via, Via::Primary);
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!((resp.origin, resp.other), (Some(local), Some(local)));
}

#[test]
fn stun_change_requests_the_relay_cannot_honour_are_dropped() {
    let mut no_alt = Lab::new();
    let mut with_alt = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let port = BindingRequest {
        txid: [1; 12],
        change_ip: false,
        change_port: true,
    }
    .encode();
    let ip = BindingRequest {
        txid: [1; 12],
        change_ip: true,
        change_port: false,
    }
    .encode();

    // Answering from the same address would tell the client its NAT filters nothing.
    assert_eq!(
        no_alt.recv(src, &port).0,
        dropped(DropReason::StunChangeUnsupported)
    );
    assert_eq!(
        with_alt.recv(src, &ip).0,
        dropped(DropReason::StunChangeUnsupported)
    );
}

#[test]
fn sessions_bound_on_the_alt_port_are_reached_through_it() {
    let mut lab = Lab::with_alt();
    let (a, b) = (agent(1), agent(2));
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("192.0.2.2:1000"));
    lab.bind(&a, a_addr, &[PARTY_X]);
    let cookie = match lab
        .recv_via(Via::Alt, b_addr, &RelayMsg::BindRequest.to_vec())
        .0
    {
        Action::Reply(t) => match RelayMsg::decode(&t.payload) {
            Ok(RelayMsg::BindChallenge { cookie }) => cookie,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let token = lab.token(&b, &[PARTY_X]);
    let bind = bind_msg(&b, &cookie, &token);
    assert!(
        matches!(lab.recv_via(Via::Alt, b_addr, &bind).0, Action::Reply(t) if t.via == Via::Alt)
    );

    let (action, _) = lab.recv(a_addr, &send_to(&b, b"x"));

    assert_eq!(
        action,
        Action::Forward {
            via: Via::Alt,
            to: b_addr,
            len: send_to(&b, b"x").len(),
            also: None,
        }
    );
}

#[test]
fn stun_response_port_is_honoured_only_for_a_padded_request() {
    let mut lab = Lab::new();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [4; 12],
        change_ip: false,
        change_port: false,
    };
    let padded = rally_proto::stun::encode_to_port(&req, 41000);
    let Action::Reply(t) = lab.recv(src, &padded).0 else {
        panic!("no answer to a padded RESPONSE-PORT request")
    };
    // The same address, the asked port; the answer is no longer than the request.
    assert_eq!(t.to, addr("203.0.113.5:41000"));
    assert!(t.payload.len() <= padded.len());
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!(resp.mapped, src);

    // Cut the padding off (keep the RESPONSE-PORT attribute): refused.
    let mut short = padded[..28].to_vec();
    short[2..4].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(
        rally_proto::stun::response_port(&short),
        Ok(Some(41000)),
        "the short request still asks for the port"
    );
    assert_eq!(lab.recv(src, &short).0, dropped(DropReason::StunUnpadded));
}
