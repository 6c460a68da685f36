//! The relay core (`rally_relay::Relay`) fed a script of datagrams from a few sources: raw bytes,
//! genuine binds (challenge, token, signature), sends, pings, STUN requests, corrupted binds and
//! time jumps. It must never panic, and what it forwards must obey the relay's rules: only
//! `Deliver`s of the same length, from the sender's own session, to an agent sharing a party.
//!
//! Script: one op byte, then that op's argument bytes (missing bytes read as 0). Binds cost
//! signatures, so an input gets at most [`BIND_BUDGET`] of them (later bind ops are skipped),
//! and tokens and signatures are cached across inputs (they are pure functions of their inputs).
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rally_proto::relay::{bind_transcript, short_id, RelayMsg, ShortId, DOMAIN_BIND};
use rally_proto::stun::BindingRequest;
use rally_proto::{Identity, RelayToken};
use rally_relay::{Action, Config, Limits, Relay, Via};

const AGENTS: usize = 4;
const UNIX_START: u64 = 1_700_000_000;
const BIND_BUDGET: u8 = 6;

type Cache = Mutex<HashMap<Vec<u8>, Vec<u8>>>;

/// `make()`, remembered by `key`.
fn cached(key: Vec<u8>, make: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap().get(&key) {
        return v.clone();
    }
    let v = make();
    let mut c = cache.lock().unwrap();
    if c.len() > 100_000 {
        c.clear();
    }
    c.insert(key, v.clone());
    v
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new();
    let mut script = Script(data);
    let mut binds = BIND_BUDGET;
    while let Some(op) = script.byte() {
        let op = op % 9;
        if matches!(op, 1 | 6 | 7) {
            if binds == 0 {
                // Skip the op's arguments, so the rest of the script reads the same.
                script.take(match op {
                    1 => 4,
                    6 => 5,
                    _ => 3,
                });
                continue;
            }
            binds -= 1;
        }
        match op {
            0 => {
                let (via, src) = (script.via(), script.src());
                let len = usize::from(script.u8());
                let bytes = script.take(len).to_vec();
                h.feed(via, src, &bytes);
            }
            1 => {
                let (agent, src, parties, ttl) =
                    (script.agent(), script.src(), script.u8() & 7, script.u8());
                h.bind(agent, src, parties, u64::from(ttl), None);
            }
            2 => {
                let (src, to) = (script.src(), script.agent());
                let len = usize::from(script.u8());
                let payload = script.take(len).to_vec();
                let msg = RelayMsg::Send {
                    to: h.short(to),
                    payload: &payload,
                }
                .to_vec();
                h.feed(Via::Primary, src, &msg);
            }
            3 => {
                let src = script.src();
                let msg = RelayMsg::Ping {
                    nonce: u64::from(script.u8()),
                }
                .to_vec();
                h.feed(Via::Primary, src, &msg);
            }
            4 => {
                let step = Duration::from_millis(u64::from(script.u8()) * 250);
                h.now += step;
                h.unix = UNIX_START + (h.now - h.start).as_secs();
                h.relay.handle_timeout(h.now, h.unix);
            }
            5 => {
                let (via, src, flags) = (script.via(), script.src(), script.u8());
                let req = BindingRequest {
                    txid: [flags; 12],
                    change_ip: flags & 1 != 0,
                    change_port: flags & 2 != 0,
                }
                .encode();
                h.feed(via, src, &req);
            }
            6 => {
                // A genuine bind with one byte of the Bind message changed.
                let (agent, src, parties) = (script.agent(), script.src(), script.u8() & 7);
                let (pos, flip) = (script.u8(), script.u8().max(1));
                h.bind(agent, src, parties, 200, Some((usize::from(pos), flip)));
            }
            7 => {
                // A bind signed by the wrong agent.
                let (agent, other, src) = (script.agent(), script.agent(), script.src());
                h.forged_bind(agent, other, src);
            }
            _ => {
                let (src, to) = (script.src(), script.agent());
                let msg = RelayMsg::Deliver {
                    from: h.short(to),
                    payload: b"x",
                }
                .to_vec();
                h.feed(Via::Alt, src, &msg);
            }
        }
    }
});

/// The control plane's and the agents' keys (deriving a public key costs a scalar multiplication,
/// so they are made once).
fn identities() -> &'static (Identity, Vec<Identity>) {
    static IDS: OnceLock<(Identity, Vec<Identity>)> = OnceLock::new();
    IDS.get_or_init(|| {
        (
            Identity::from_seed([200; 32]),
            (0..AGENTS as u8)
                .map(|i| Identity::from_seed([i + 1; 32]))
                .collect(),
        )
    })
}

struct Harness {
    relay: Relay,
    control: &'static Identity,
    agents: &'static [Identity],
    /// The party mask of each agent's last successful bind (what the relay holds for it).
    parties: [u8; AGENTS],
    sources: [SocketAddr; 5],
    start: Instant,
    now: Instant,
    unix: u64,
}

impl Harness {
    fn new() -> Self {
        let (control, agents) = identities();
        let mut config = Config::new(control.public(), "198.51.100.1:3478".parse().unwrap());
        config.alt = Some("198.51.100.1:3479".parse().unwrap());
        config.limits = Limits {
            max_sessions: 3,
            max_sessions_per_ip: 2,
            max_pps: 40,
            max_bps: 8 * 2000,
            idle_timeout: Duration::from_secs(5),
            handshake_rate: 8,
            handshake_burst: 24,
        };
        let start = Instant::now();
        Harness {
            relay: Relay::new(config, [1; 32], start),
            control,
            agents,
            parties: [0; AGENTS],
            sources: [
                "192.0.2.1:1000".parse().unwrap(),
                "192.0.2.1:1001".parse().unwrap(),
                "[::ffff:192.0.2.1]:1002".parse().unwrap(),
                "[2001:db8::1]:1000".parse().unwrap(),
                "203.0.113.9:65535".parse().unwrap(),
            ],
            start,
            now: start,
            unix: UNIX_START,
        }
    }

    fn short(&self, agent: usize) -> ShortId {
        short_id(&self.agents[agent].public())
    }

    /// A token for `agent` in the parties of the bit mask, valid until `ttl` seconds after the
    /// start (so a late bind may find it expired).
    fn token(&self, agent: usize, parties: u8, ttl: u64) -> Vec<u8> {
        let key = [b't', agent as u8, parties, ttl as u8].to_vec();
        cached(key, || {
            RelayToken {
                agent: self.agents[agent].public(),
                expires_at: UNIX_START + ttl,
                parties: (0..3u8)
                    .filter(|b| parties & (1 << b) != 0)
                    .map(|b| [b; 8])
                    .collect(),
            }
            .sign(&self.control)
        })
    }

    /// `signer`'s bind signature over `cookie` and `token`.
    fn bind_signature(&self, signer: usize, cookie: &[u8; 32], token: &[u8]) -> [u8; 64] {
        let mut key = vec![b's', signer as u8];
        key.extend_from_slice(cookie);
        key.extend_from_slice(token);
        let sig = cached(key, || {
            self.agents[signer]
                .sign(DOMAIN_BIND, &bind_transcript(cookie, token))
                .to_vec()
        });
        let mut out = [0u8; 64];
        out.copy_from_slice(&sig);
        out
    }

    fn challenge(&mut self, src: usize) -> Option<[u8; 32]> {
        match self.feed(Via::Primary, src, &RelayMsg::BindRequest.to_vec()) {
            Action::Reply(t) => match RelayMsg::decode(&t.payload) {
                Ok(RelayMsg::BindChallenge { cookie }) => Some(cookie),
                other => panic!("BindRequest answered with {other:?}"),
            },
            _ => None,
        }
    }

    fn bind(
        &mut self,
        agent: usize,
        src: usize,
        parties: u8,
        ttl: u64,
        corrupt: Option<(usize, u8)>,
    ) {
        let Some(cookie) = self.challenge(src) else {
            return;
        };
        let token = self.token(agent, parties, ttl);
        let signature = self.bind_signature(agent, &cookie, &token);
        let mut msg = RelayMsg::Bind {
            cookie,
            signature,
            token: &token,
        }
        .to_vec();
        if let Some((pos, flip)) = corrupt {
            let pos = pos % msg.len();
            msg[pos] ^= flip;
        }
        let action = self.feed(Via::Primary, src, &msg);
        let accepted = matches!(
            &action,
            Action::Reply(t) if matches!(RelayMsg::decode(&t.payload), Ok(RelayMsg::BindOk { .. }))
        );
        if accepted {
            assert!(corrupt.is_none(), "a corrupted Bind was accepted");
            self.parties[agent] = parties;
        }
    }

    fn forged_bind(&mut self, agent: usize, signer: usize, src: usize) {
        let Some(cookie) = self.challenge(src) else {
            return;
        };
        let token = self.token(agent, 7, 100);
        let signature = self.bind_signature(signer, &cookie, &token);
        let msg = RelayMsg::Bind {
            cookie,
            signature,
            token: &token,
        }
        .to_vec();
        let action = self.feed(Via::Primary, src, &msg);
        if agent != signer {
            assert!(
                matches!(action, Action::Drop { .. }),
                "a Bind signed by another agent was accepted"
            );
        } else if matches!(action, Action::Reply(_)) {
            self.parties[agent] = 7;
        }
    }

    /// Feeds one datagram and checks the result against the relay's rules.
    fn feed(&mut self, via: Via, src: usize, datagram: &[u8]) -> Action {
        let src_addr = self.sources[src];
        let mut buf = datagram.to_vec();
        let action = self
            .relay
            .handle_datagram(via, src_addr, &mut buf, self.now, self.unix);
        match &action {
            Action::Forward { to, len, .. } => {
                assert_eq!(*len, datagram.len(), "forwarded a different length");
                let Ok(RelayMsg::Deliver { from, payload }) = RelayMsg::decode(&buf) else {
                    panic!("forwarded something other than a Deliver");
                };
                assert_eq!(payload, &datagram[12..], "the payload changed");
                let sender = (0..AGENTS)
                    .find(|&i| self.short(i) == from)
                    .expect("forwarded from an unknown agent");
                assert_eq!(
                    self.relay.session_addr(&from),
                    Some(src_addr),
                    "forwarded for a session that is not the sender's"
                );
                let receiver = (0..AGENTS)
                    .find(|&i| self.relay.session_addr(&self.short(i)) == Some(*to))
                    .expect("forwarded to an address with no session");
                assert!(
                    self.parties[sender] & self.parties[receiver] != 0,
                    "forwarded across parties"
                );
            }
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                let handshake = matches!(
                    RelayMsg::decode(&t.payload),
                    Ok(RelayMsg::BindChallenge { .. } | RelayMsg::BindOk { .. })
                ) || rally_proto::stun::is_stun(&t.payload);
                assert!(
                    handshake || t.payload.len() <= datagram.len(),
                    "an amplifying reply: {} bytes for {}",
                    t.payload.len(),
                    datagram.len()
                );
                assert_eq!(t.to, src_addr, "a reply to someone else");
            }
            Action::Drop { reply: None, .. } => {}
        }
        action
    }
}

/// Reads the fuzz input as a script.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u8(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn src(&mut self) -> usize {
        usize::from(self.u8()) % 5
    }

    fn agent(&mut self) -> usize {
        usize::from(self.u8()) % AGENTS
    }

    fn via(&mut self) -> Via {
        if self.u8() & 1 == 0 {
            Via::Primary
        } else {
            Via::Alt
        }
    }
}
