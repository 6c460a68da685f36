//! A simulated network for node tests: agents (each a [`Node`]) on public addresses or behind
//! NAT models, the relay's real protocol core ([`rally_relay::core::Relay`]), a stand-in for
//! the control plane (peer updates, endpoint registration, punch requests), one-way latency,
//! loss and cuts, and a fake clock that jumps straight to the next event.
//!
//! The engine's WireGuard part is not in the node; the simulation plays it with a stand-in data
//! message (`4 0 0 0` + the sender's id) whose receipt counts as authenticated traffic.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_proto::control::NatReport;
use rally_proto::relay::{write_send_header, DATA_HEADER_LEN};
use rally_proto::{Identity, Key32, PeerEvent, PeerInfo, RelayToken};
use rally_relay::core::{Config, Relay};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Node, NodeConfig, NodeEvent, Route, SideOp, SideSocket};
use crate::conn::{PathId, Profile};
use crate::node::RelayConfig;

mod nat;
mod tcp;
mod wire;

pub use nat::NatKind;
use nat::Router;
use wire::InFlight;

pub struct Agent {
    pub node: Node,
    pub id: Key32,
    wg: Key32,
    name: String,
    pub local: SocketAddr,
    router: Option<usize>,
    nat: Option<NatReport>,
    /// Everything the node emitted, with the time.
    pub events: Vec<(Instant, NodeEvent)>,
    /// Stand-in data messages received: (time, from peer, path).
    pub received: Vec<(Instant, Key32, PathId)>,
    /// Times the agent's driver would have woken: a timer of its node, or datagrams (those
    /// arriving at the same instant are read in one wake-up).
    pub wakes: u64,
    last_wake: Option<Instant>,
    /// Answers every data message with one of its own (a ping responder).
    pub echo: bool,
    /// Probes the agent sent on a direct path: (time, destination).
    pub direct_probes: Vec<(Instant, SocketAddr)>,
    /// Side sockets while they are open (the netcheck's, birthday punching's).
    pub(super) sides: HashMap<SideSocket, SocketAddr>,
    /// Direct addresses whose datagrams go from a side socket's address instead.
    pub(super) carried: HashMap<SocketAddr, SocketAddr>,
    next_side: u16,
}

struct SimRelay {
    core: Relay,
    name: String,
    primary: SocketAddr,
    alt: SocketAddr,
}

pub struct Sim {
    pub now: Instant,
    pub agents: Vec<Agent>,
    routers: Vec<Router>,
    relays: Vec<SimRelay>,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// One-way delay of every hop.
    pub latency: Duration,
    /// Fraction of datagrams lost on every hop.
    pub loss: f64,
    /// Datagrams between these two public IPs vanish (both ways).
    pub cuts: Vec<(IpAddr, IpAddr)>,
    /// Extra delay of everything leaving relay `i` (a slow relay).
    pub relay_delay: HashMap<usize, Duration>,
    /// Random extra delay, uniform in 0 ..= this, of each datagram leaving relay `i` (jitter).
    pub relay_jitter: HashMap<usize, Duration>,
    /// Relays listen on TCP too (set before [`Sim::start`]).
    pub tcp: bool,
    /// Agents whose network lets out no UDP (their LAN still works).
    pub udp_blocked: HashSet<usize>,
    rng: ChaCha8Rng,
    control: Identity,
    /// Seeds the random NATs' ports (tests vary it to run many attempts).
    pub nat_seed: u64,
}

const UNIX_START: u64 = 1_800_000_000;
const PARTY: [u8; 8] = [7; 8];

impl Sim {
    pub fn new(now: Instant) -> Sim {
        Sim {
            now,
            agents: Vec::new(),
            routers: Vec::new(),
            relays: Vec::new(),
            wire: BinaryHeap::new(),
            seq: 0,
            latency: Duration::from_millis(10),
            loss: 0.0,
            cuts: Vec::new(),
            relay_delay: HashMap::new(),
            relay_jitter: HashMap::new(),
            tcp: false,
            udp_blocked: HashSet::new(),
            rng: ChaCha8Rng::seed_from_u64(1),
            control: Identity::from_seed([99; 32]),
            nat_seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// A relay at 198.51.100.N:3478 (alternate port 3479).
    pub fn add_relay(&mut self, name: &str) {
        let ip = Ipv4Addr::new(198, 51, 100, self.relays.len() as u8 + 1);
        let primary = SocketAddr::new(ip.into(), 3478);
        let alt = SocketAddr::new(ip.into(), 3479);
        let mut config = Config::new(self.control.public(), primary);
        config.alt = Some(alt);
        let core = Relay::new(config, [self.relays.len() as u8; 32], self.now);
        self.relays.push(SimRelay {
            core,
            name: name.into(),
            primary,
            alt,
        });
    }

    /// An agent behind a NAT of `kind` (its own router), or on a public address.
    pub fn add_agent(&mut self, kind: NatKind) -> usize {
        let n = self.agents.len() as u8 + 1;
        let (local, router) = match kind {
            NatKind::Public => (
                SocketAddr::new(Ipv4Addr::new(203, 0, 113, n).into(), 51820),
                None,
            ),
            _ => {
                self.routers.push(Router {
                    public: Ipv4Addr::new(203, 0, 113, 100 + n),
                    kind,
                    next_port: 40_000,
                    out: HashMap::new(),
                    inside: HashMap::new(),
                    sent: HashSet::new(),
                    random: self.nat_seed ^ u64::from(n) << 32 | 1,
                });
                let local = SocketAddr::new(Ipv4Addr::new(192, 168, n, 2).into(), 51820);
                (local, Some(self.routers.len() - 1))
            }
        };
        self.add_agent_at(local, router)
    }

    /// Another agent behind the same router as agent `other` (a LAN).
    pub fn add_agent_beside(&mut self, other: usize) -> usize {
        let n = self.agents.len() as u8 + 1;
        let router = self.agents[other].router;
        let IpAddr::V4(ip) = self.agents[other].local.ip() else {
            unreachable!("the simulation is IPv4")
        };
        let [a, b, c, _] = ip.octets();
        self.add_agent_at(
            SocketAddr::new(Ipv4Addr::new(a, b, c, 10 + n).into(), 51820),
            router,
        )
    }

    fn add_agent_at(&mut self, local: SocketAddr, router: Option<usize>) -> usize {
        let n = self.agents.len() as u8 + 1;
        let identity = Arc::new(Identity::from_seed([n; 32]));
        let wg_secret = [n.wrapping_add(50); 32];
        let wg = Key32(
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(wg_secret)).to_bytes(),
        );
        let node = Node::new(
            NodeConfig {
                identity: identity.clone(),
                wg_secret,
                profile: Profile::stable(),
                local_port: local.port(),
                local_ips: vec![local.ip()],
            },
            [n; 32],
            // Agents started at different moments: their timers are not in step.
            self.now - Duration::from_millis(137 * u64::from(n)),
        );
        self.agents.push(Agent {
            node,
            id: identity.public(),
            wg,
            name: format!("agent{n}"),
            local,
            router,
            nat: None,
            events: Vec::new(),
            received: Vec::new(),
            wakes: 0,
            last_wake: None,
            echo: false,
            direct_probes: Vec::new(),
            sides: HashMap::new(),
            carried: HashMap::new(),
            next_side: 50_000,
        });
        self.agents.len() - 1
    }

    /// Hands every agent the relays (with a token) and every other agent as a peer.
    pub fn start(&mut self) {
        let relays: Vec<RelayConfig> = self
            .relays
            .iter()
            .map(|r| RelayConfig {
                name: r.name.as_str().into(),
                host: r.primary.to_string(),
                addr: r.primary,
                tcp: self.tcp.then(|| tcp::endpoint(r)),
            })
            .collect();
        for a in 0..self.agents.len() {
            let token = RelayToken {
                agent: self.agents[a].id,
                expires_at: UNIX_START + 1_000_000,
                parties: vec![PARTY],
            }
            .sign(&self.control);
            let now = self.now;
            self.agents[a]
                .node
                .handle_relays(relays.clone(), token, now);
            let peers = (0..self.agents.len())
                .filter(|b| *b != a)
                .map(|b| PeerEvent::Added(self.info(b)))
                .collect();
            self.agents[a].node.handle_peer_changes(peers, now);
            self.drain(a);
        }
    }

    /// What the control plane says about agent `a`.
    pub fn info(&self, a: usize) -> Arc<PeerInfo> {
        let ag = &self.agents[a];
        Arc::new(PeerInfo {
            peer_id: ag.id,
            name: ag.name.clone(),
            wg_key: ag.wg,
            virtual_ip: Ipv4Addr::new(100, 64, 0, a as u8 + 1),
            endpoints: self.endpoints(a),
            parties: vec!["p".into()],
            nat: ag.nat.clone(),
        })
    }

    /// The endpoints agent `a` registers: its local address and its public one, once known.
    fn endpoints(&self, a: usize) -> Vec<SocketAddr> {
        let ag = &self.agents[a];
        let mut e = vec![ag.local];
        if let Some(p) = ag.nat.as_ref().and_then(|n| n.public_endpoint) {
            if p != ag.local {
                e.push(p);
            }
        }
        e
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        let pair = (self.public_ip(a), self.public_ip(b));
        self.cuts.push(pair);
    }

    pub fn heal(&mut self) {
        self.cuts.clear();
    }

    pub fn public_ip(&self, a: usize) -> IpAddr {
        match self.agents[a].router {
            Some(r) => self.routers[r].public.into(),
            None => self.agents[a].local.ip(),
        }
    }

    /// Moves agent `a`'s router to a new public address (its mappings are lost).
    pub fn renumber_router(&mut self, a: usize, public: Ipv4Addr) {
        let r = self.agents[a].router.expect("the agent is behind a router");
        let router = &mut self.routers[r];
        router.public = public;
        router.out.clear();
        router.inside.clear();
        router.sent.clear();
    }

    pub fn id(&self, a: usize) -> Key32 {
        self.agents[a].id
    }

    /// Where agent `a` sends to agent `b` now.
    pub fn route(&self, a: usize, b: usize) -> Option<Route> {
        self.agents[a].node.route(&self.agents[b].id)
    }

    /// Agent `a` sends one stand-in data message to `b` (queued by the node if no route).
    pub fn send_data(&mut self, a: usize, b: usize) {
        let now = self.now;
        let peer = self.agents[b].id;
        self.agents[a].node.handle_tunnel_tx(&peer, now);
        let mut msg = vec![4, 0, 0, 0];
        msg.extend_from_slice(&self.agents[a].id.0);
        match self.agents[a].node.route(&peer) {
            Some(route) => self.send_on(a, route, &msg),
            None => self.agents[a].node.enqueue(&peer, msg),
        }
        self.drain(a);
    }

    fn send_on(&mut self, a: usize, route: Route, msg: &[u8]) {
        match route {
            Route::Direct(to) => self.send_from(a, to, msg.to_vec()),
            Route::Relay { relay, peer } => {
                let mut framed = vec![0u8; DATA_HEADER_LEN + msg.len()];
                write_send_header(&mut framed, &peer);
                framed[DATA_HEADER_LEN..].copy_from_slice(msg);
                self.send_from(a, relay, framed);
            }
        }
    }

    /// Runs until `done` holds or `end`; returns whether `done` held.
    pub fn run_until(&mut self, end: Instant, mut done: impl FnMut(&Sim) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let Some(next) = self.next_event().filter(|t| *t <= end) else {
                self.now = end.max(self.now);
                return false;
            };
            self.now = next.max(self.now);
            self.step();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end, |_| false);
    }

    fn next_event(&mut self) -> Option<Instant> {
        let wire = self.wire.peek().map(|Reverse(p)| p.at);
        let relays = self.relays.iter().filter_map(|r| r.core.poll_timeout());
        let agents: Vec<Instant> = self
            .agents
            .iter_mut()
            .filter_map(|a| a.node.poll_timeout().map(|(t, _)| t))
            .collect();
        wire.into_iter().chain(relays).chain(agents).min()
    }

    fn step(&mut self) {
        let now = self.now;
        while self.wire.peek().is_some_and(|Reverse(p)| p.at <= now) {
            let Some(Reverse(p)) = self.wire.pop() else {
                break;
            };
            self.deliver(p);
        }
        let unix = self.unix();
        for r in &mut self.relays {
            if r.core.poll_timeout().is_some_and(|t| t <= now) {
                r.core.handle_timeout(now, unix);
            }
        }
        for a in 0..self.agents.len() {
            if self.agents[a]
                .node
                .poll_timeout()
                .is_some_and(|(t, _)| t <= now)
            {
                self.agents[a].wake(now);
                self.agents[a].node.handle_timeout(now);
                self.drain(a);
            }
        }
    }

    fn unix(&self) -> u64 {
        UNIX_START
    }

    /// Performs what agent `a`'s node queued, playing the engine and the control plane.
    fn drain(&mut self, a: usize) {
        loop {
            if let Some(t) = self.agents[a].node.poll_transmit() {
                self.send_from(a, t.to, t.payload);
            } else if let Some((peer, packet)) = self.agents[a].node.poll_packet() {
                if let Some(route) = self.agents[a].node.route(&peer) {
                    self.send_on(a, route, &packet);
                }
            } else if let Some(op) = self.agents[a].node.poll_side() {
                self.side_op(a, op);
            } else if let Some(ev) = self.agents[a].node.poll_event() {
                self.control_plane(a, &ev);
                let now = self.now;
                self.agents[a].events.push((now, ev));
            } else {
                return;
            }
        }
    }

    /// Performs one side-socket operation of agent `a`'s node.
    fn side_op(&mut self, a: usize, op: SideOp) {
        let ag = &mut self.agents[a];
        match op {
            SideOp::Send {
                socket,
                to,
                payload,
            } => {
                let ip = ag.local.ip();
                let next = &mut ag.next_side;
                let local = *ag.sides.entry(socket).or_insert_with(|| {
                    *next = next.wrapping_add(1).max(50_001);
                    SocketAddr::new(ip, *next)
                });
                self.send_from_addr(a, local, to, payload);
            }
            SideOp::Close(socket) => {
                if let Some(local) = ag.sides.remove(&socket) {
                    ag.carried.retain(|_, l| *l != local);
                }
            }
            SideOp::Carry { socket, to } => {
                if let Some(local) = ag.sides.get(&socket) {
                    ag.carried.insert(to, *local);
                }
            }
        }
    }

    /// The control plane's part: endpoints registered from NAT reports, peer updates, punch
    /// requests to both sides.
    fn control_plane(&mut self, a: usize, ev: &NodeEvent) {
        let now = self.now;
        match ev {
            NodeEvent::Nat { report, .. } => {
                self.agents[a].nat = Some(report.clone());
                let info = self.info(a);
                for b in (0..self.agents.len()).filter(|b| *b != a) {
                    let change = vec![PeerEvent::Updated(info.clone())];
                    self.agents[b].node.handle_peer_changes(change, now);
                    self.drain(b);
                }
            }
            NodeEvent::WantPunch(peer) => {
                let Some(b) = self.agents.iter().position(|x| x.id == *peer) else {
                    return;
                };
                let (ea, eb) = (self.endpoints(a), self.endpoints(b));
                let (ia, ib) = (self.agents[a].id, self.agents[b].id);
                self.agents[b].node.handle_punch(ia, &ea, now);
                self.agents[a].node.handle_punch(ib, &eb, now);
                self.drain(b);
            }
            _ => {}
        }
    }
}

impl Agent {
    fn wake(&mut self, now: Instant) {
        if self.last_wake != Some(now) {
            self.last_wake = Some(now);
            self.wakes += 1;
        }
    }
}
