#![allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock

use super::*;

const LOCAL: &str = "192.168.1.2:51820";
const PUBLIC_IP: &str = "203.0.113.7";
const RELAY1: &str = "198.51.100.5:3478";
const RELAY1_ALT: &str = "198.51.100.5:3479";

fn servers() -> Vec<StunServer> {
    ["198.51.100.5:3478", "198.51.100.6:3478"]
        .iter()
        .enumerate()
        .map(|(i, a)| StunServer {
            name: format!("r{}", i + 1),
            host: a.to_string(),
            addr: a.parse().unwrap(),
        })
        .collect()
}

fn start(now: Instant) -> Netcheck {
    let local: SocketAddr = LOCAL.parse().unwrap();
    Netcheck::new(servers(), local.port(), vec![local.ip()], [1; 32], now)
}

fn requests(n: &mut Netcheck) -> Vec<(NetcheckTransmit, BindingRequest)> {
    std::iter::from_fn(|| n.poll_transmit())
        .map(|t| {
            let r = BindingRequest::decode(&t.payload).unwrap();
            (t, r)
        })
        .collect()
}

/// What a NAT in front of the agent lets in (RFC 4787).
#[derive(Clone, Copy, PartialEq)]
enum Filter {
    Open,
    Address,
    AddressAndPort,
}

/// A small model of the path: the NAT maps the main socket to `main_port` (or a new port per
/// destination when `symmetric`) and the side socket to `side_port`, and filters by `filter`;
/// the relays answer as `rally-relay` does. Runs the netcheck to its end.
struct World {
    symmetric: bool,
    filter: Filter,
    /// The relays answer RESPONSE-PORT (an old relay answers the sender instead).
    response_port: bool,
    public_ip: &'static str,
}

impl World {
    fn run(&self, n: &mut Netcheck, t0: Instant) -> NatReport {
        let mut contacted: Vec<(bool, SocketAddr)> = Vec::new();
        let mut next_port = 40000;
        let mut ports: Vec<(bool, Option<SocketAddr>, u16)> = Vec::new();
        for _ in 0..5 {
            let reqs = requests(n);
            if reqs.is_empty() {
                break;
            }
            for (t, r) in reqs {
                contacted.push((t.side, t.to));
                let dest = self.symmetric.then_some(t.to);
                let port = match ports.iter().find(|(s, d, _)| *s == t.side && *d == dest) {
                    Some((_, _, p)) => *p,
                    None if !t.side && !self.symmetric && self.public_ip != PUBLIC_IP => 51820,
                    None => {
                        next_port += 1;
                        ports.push((t.side, dest, next_port));
                        next_port
                    }
                };
                let mapped = format!("{}:{port}", self.public_ip).parse().unwrap();
                let alt: SocketAddr = RELAY1_ALT.parse().unwrap();
                let from = if r.change_port { alt } else { t.to };
                let asked = stun::response_port(&t.payload).unwrap();
                let to_side = match asked.filter(|_| self.response_port) {
                    // Which of our sockets holds the mapping at that port?
                    Some(p) => ports.iter().any(|(s, _, q)| *s && *q == p),
                    None => t.side,
                };
                let let_in = match self.filter {
                    Filter::Open => true,
                    Filter::Address => contacted
                        .iter()
                        .any(|(s, c)| *s == to_side && c.ip() == from.ip()),
                    Filter::AddressAndPort => contacted.contains(&(to_side, from)),
                };
                if !let_in {
                    continue;
                }
                let other = (t.to.to_string() == RELAY1).then_some(alt);
                let resp = BindingResponse {
                    txid: r.txid,
                    mapped,
                    other,
                    origin: None,
                };
                n.handle_response(resp, to_side, t0 + Duration::from_millis(40));
            }
        }
        n.report()
    }
}

fn world(symmetric: bool, filter: Filter) -> World {
    World {
        symmetric,
        filter,
        response_port: true,
        public_ip: PUBLIC_IP,
    }
}

#[test]
fn a_home_router_is_endpoint_independent_and_filters_address_and_port() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let rep = world(false, Filter::AddressAndPort).run(&mut n, t0);
    assert!(rep.udp);
    assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
    assert_eq!(rep.filtering, NatBehavior::AddressAndPortDependent);
    assert_eq!(rep.relays[0].latency_ms, Some(40.0));
}

#[test]
fn a_full_cone_filters_nothing() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let rep = world(false, Filter::Open).run(&mut n, t0);
    assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
    assert_eq!(rep.filtering, NatBehavior::EndpointIndependent);
}

#[test]
fn a_restricted_cone_filters_by_address() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let rep = world(false, Filter::Address).run(&mut n, t0);
    assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
    assert_eq!(rep.filtering, NatBehavior::AddressDependent);
}

#[test]
fn a_symmetric_nat_maps_and_filters_address_and_port() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let rep = world(true, Filter::AddressAndPort).run(&mut n, t0);
    assert_eq!(rep.mapping, NatBehavior::AddressAndPortDependent);
    assert_eq!(rep.filtering, NatBehavior::AddressAndPortDependent);
    assert!(!rep.port_preserving);
}

#[test]
fn no_nat_is_open() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let w = World {
        public_ip: "192.168.1.2",
        ..world(false, Filter::Open)
    };
    let rep = w.run(&mut n, t0);
    assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
    assert_eq!(rep.filtering, NatBehavior::EndpointIndependent);
    assert!(n.is_done(t0));
}

#[test]
fn a_relay_without_response_port_leaves_address_filtering_unknown() {
    // The answer comes back to the main socket: it proves nothing about the side mapping.
    let t0 = Instant::now();
    let mut n = start(t0);
    let w = World {
        response_port: false,
        ..world(false, Filter::Open)
    };
    let rep = w.run(&mut n, t0);
    assert_eq!(rep.filtering, NatBehavior::Unknown);
    // Port filtering is still decided without it.
    let mut n = start(t0);
    let w = World {
        response_port: false,
        ..world(false, Filter::AddressAndPort)
    };
    assert_eq!(
        w.run(&mut n, t0).filtering,
        NatBehavior::AddressAndPortDependent
    );
}

#[test]
fn the_side_socket_sends_only_to_the_first_relays_primary_port() {
    let t0 = Instant::now();
    let mut n = start(t0);
    let _ = world(false, Filter::AddressAndPort).run(&mut n, t0);
    let sides: Vec<_> = n.probes.iter().filter(|p| p.side()).collect();
    assert_eq!(sides.len(), 2);
    assert!(sides.iter().all(|p| p.to == RELAY1.parse().unwrap()));
    let to_side = n.probes.iter().find(|p| p.kind == Kind::ToSide).unwrap();
    assert!(!to_side.side());
    assert_eq!(to_side.to, "198.51.100.6:3478".parse().unwrap());
}

#[test]
fn silence_means_no_udp_and_requests_are_retransmitted() {
    let t0 = Instant::now();
    let mut n = start(t0);
    // Both relays from the main socket, the first from the side socket.
    assert_eq!(requests(&mut n).len(), 3);
    let t1 = n.poll_timeout();
    assert_eq!(t1, t0 + RETRANSMITS[0]);
    n.handle_timeout(t1);
    assert_eq!(requests(&mut n).len(), 3);
    assert!(!n.is_done(t1));
    assert!(n.is_done(t0 + DURATION));
    let rep = n.report();
    assert!(!rep.udp);
    assert_eq!(rep.mapping, NatBehavior::Unknown);
    assert_eq!(rep.filtering, NatBehavior::Unknown);
}

#[test]
fn a_sequential_step_is_believed_only_when_small_and_consistent() {
    use super::sequential_step;
    let a = |p: u16| SocketAddr::new("203.0.113.9".parse().unwrap(), p);
    // First relay, second relay, then (after the side socket's mapping) the alternate port.
    assert_eq!(sequential_step(a(40001), a(40002), Some(a(40004))), Some(1));
    assert_eq!(sequential_step(a(40010), a(40008), None), Some(-2));
    // Random ports, a step back after a step forward, no step at all.
    assert_eq!(sequential_step(a(40001), a(51234), None), None);
    assert_eq!(sequential_step(a(40001), a(40002), Some(a(39000))), None);
    assert_eq!(sequential_step(a(40001), a(40001), None), None);
}
