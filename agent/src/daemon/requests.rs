//! The owner's answers to CLI requests. What needs nothing but the owner's state is answered
//! at once; what waits on the control plane or the data plane runs in a task of its own, which
//! answers the CLI itself and reports any new state back to the owner as a [`Msg`].

use std::time::Duration;

use rally_proto::{InviteCode, Key32, Request, Response};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::owner::{Msg, Owner};
use crate::api::{
    resolve_peer, ControlStatus, IpcReply, IpcRequest, IpcResult, NetcheckReport, StatusReport,
};
use crate::conn::PathId;
use crate::control::{ControlError, ControlHandle};
use crate::dataplane::{EngineCmd, EngineHandle};
use crate::state::ControlTarget;

/// How long `party join` waits for the agent to register with a control plane it just learned.
const REGISTER_WAIT: Duration = Duration::from_secs(15);

impl Owner {
    pub(super) fn handle_request(&mut self, req: IpcRequest, reply: oneshot::Sender<IpcResult>) {
        match req {
            IpcRequest::Status => answer(reply, Ok(IpcReply::Status(self.status()))),
            IpcRequest::Peers => match self.engine.clone() {
                Some(engine) => respond(reply, async move {
                    Ok(IpcReply::Peers {
                        peers: engine.peers().await,
                    })
                }),
                None => answer(reply, Ok(IpcReply::Peers { peers: Vec::new() })),
            },
            IpcRequest::PartyCreate {
                name,
                max_uses,
                expires_in_secs,
            } => self.party_request(
                reply,
                Request::CreateParty {
                    name,
                    max_uses,
                    expires_in_secs,
                },
            ),
            IpcRequest::PartyJoin { code } => self.join(code, reply),
            IpcRequest::PartyLeave { party } => {
                self.party_request(reply, Request::LeaveParty { party })
            }
            IpcRequest::PartyList => self.party_list(reply),
            IpcRequest::Netcheck => self.netcheck(reply),
            IpcRequest::PeerReconnect { peer } => match self.data_plane() {
                Ok(engine) => respond(reply, async move {
                    let id = peer_id(&engine, &peer).await?;
                    engine.send(EngineCmd::Reconnect(Some(id)));
                    Ok(IpcReply::Ok)
                }),
                Err(e) => answer(reply, Err(e)),
            },
            IpcRequest::SetPrimary { peer, path } => match self.data_plane() {
                Ok(engine) => respond(reply, set_primary(engine, peer, path)),
                Err(e) => answer(reply, Err(e)),
            },
            IpcRequest::Discovery => match self.engine.clone() {
                Some(engine) => respond(reply, async move {
                    engine
                        .discovery()
                        .await
                        .map(|d| IpcReply::Discovery(Box::new(d)))
                        .ok_or_else(|| "the data plane stopped".into())
                }),
                None => answer(
                    reply,
                    Err("no virtual IP yet: join or create a party first".into()),
                ),
            },
            IpcRequest::Events { .. } => answer(reply, Err("events are streamed".into())),
            IpcRequest::Down => {
                self.down.push(reply);
                self.stopping.get_or_insert(Ok(()));
            }
        }
    }

    /// `party list`: the control plane's answer, which also refreshes the owner's parties.
    fn party_list(&mut self, reply: oneshot::Sender<IpcResult>) {
        let control = match self.control() {
            Ok(control) => control,
            Err(e) => return answer(reply, Err(e)),
        };
        let me = self.me.clone();
        respond(reply, async move {
            match control.request(Request::ListParties).await {
                Ok(Response::Parties { parties }) => {
                    let _ = me.send(Msg::Parties(parties.clone())).await;
                    Ok(IpcReply::Parties { parties })
                }
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(e) => Err(control_error(e)),
            }
        })
    }

    /// `netcheck`: the engine's fresh NAT report with the port mapping and control transport.
    fn netcheck(&mut self, reply: oneshot::Sender<IpcResult>) {
        let Some(engine) = self.engine.clone() else {
            return answer(
                reply,
                Err("not connected yet: the agent has no virtual IP".into()),
            );
        };
        let port_mapping = self.mapping;
        let control_transport = self
            .link_state
            .borrow()
            .transport
            .map(|t| t.as_str().to_owned());
        respond(reply, async move {
            let mut nat = engine.netcheck().await?;
            nat.mapped_endpoint = port_mapping.map(|m| m.external);
            let paths = engine.relay_paths().await;
            Ok(IpcReply::Netcheck(NetcheckReport {
                nat,
                port_mapping,
                control_transport,
                relay_transport: relay_transport(&paths),
                relay_paths: paths.iter().map(ToString::to_string).collect(),
            }))
        })
    }

    fn status(&self) -> StatusReport {
        let link = self.link_state.borrow();
        StatusReport {
            name: self.name.clone(),
            peer_id: self.identity.public().to_string(),
            virtual_ip: self.virtual_ip,
            control: ControlStatus {
                connected: link.connected,
                addr: self.link.as_ref().map(|l| l.target.addr.clone()),
                error: link.error.clone(),
                transport: link.transport.map(|t| t.as_str().to_owned()),
            },
            nat: self.backlog.nat().cloned(),
            parties: self.parties.clone(),
            listen_port: self.listen_port,
            port_mapping: self.mapping,
        }
    }

    /// Create or leave: the control plane's answer, then the parties refreshed.
    fn party_request(&self, reply: oneshot::Sender<IpcResult>, req: Request) {
        match self.control() {
            Ok(control) => respond(reply, party_call(control, req, self.me.clone())),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// `party join`: with the control plane the invite names, connecting to it first if the
    /// agent has none, or switching to the invite's address when it names the same control
    /// plane (same key) at another address; then waits for the registration.
    fn join(&mut self, code: String, reply: oneshot::Sender<IpcResult>) {
        let invite = match InviteCode::decode(&code) {
            Ok(i) => i,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return;
            }
        };
        let target = ControlTarget {
            addr: invite.control_addr.clone(),
            key: invite.control_key,
        };
        let current = self.link.as_ref().map(|l| l.target.clone());
        match current {
            Some(t) if t == target => {}
            Some(t) if t.key != target.key => {
                let _ = reply.send(Err(format!(
                    "this invite is for control plane {} (key {}), but this agent belongs to {} (key {}); \
                     use another --state-dir to join a second control plane",
                    target.addr,
                    target.key.short(),
                    t.addr,
                    t.key.short()
                )));
                return;
            }
            old => {
                if let Some(old) = old {
                    info!(old = %old.addr, new = %target.addr, "the invite gives a new address for this agent's control plane; switching to it");
                }
                if let Err(e) = self.save_control(&target) {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.connect_control(target.clone());
            }
        }
        let Some(link) = &self.link else { return };
        let control = link.handle.clone();
        let mut state = self.link_state.subscribe();
        let generation = state.borrow().generation;
        let me = self.me.clone();
        respond(reply, async move {
            let registered = state.wait_for(|s| s.generation == generation && s.connected);
            if !matches!(
                tokio::time::timeout(REGISTER_WAIT, registered).await,
                Ok(Ok(_))
            ) {
                let why = state.borrow().error.clone();
                return Err(format!(
                    "cannot reach the control plane at {}: {}",
                    target.addr,
                    why.as_deref().unwrap_or("no answer")
                ));
            }
            party_call(control, Request::JoinParty { code }, me).await
        });
    }

    /// Saves the control plane the agent belongs to.
    fn save_control(&self, target: &ControlTarget) -> Result<(), String> {
        let mut saved = self.state.load_saved().map_err(|e| e.to_string())?;
        saved.control = Some(target.clone());
        self.state.store_saved(&saved).map_err(|e| e.to_string())
    }

    fn control(&self) -> Result<ControlHandle, String> {
        self.link.as_ref().map(|l| l.handle.clone()).ok_or_else(|| {
            "this agent has no control plane yet: start it with --control and --control-key, \
             or join a party with an invite code"
                .to_string()
        })
    }

    fn data_plane(&self) -> Result<EngineHandle, String> {
        self.engine
            .clone()
            .ok_or_else(|| "the agent has no peers yet".to_string())
    }
}

fn answer(reply: oneshot::Sender<IpcResult>, result: IpcResult) {
    let _ = reply.send(result);
}

/// Answers `reply` with what `work` finds, in a task of its own.
fn respond(
    reply: oneshot::Sender<IpcResult>,
    work: impl std::future::Future<Output = IpcResult> + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = reply.send(work.await);
    });
}

/// A party request, then the parties refreshed (reported to the owner before the CLI hears
/// back, so a `rally status` after it shows them).
async fn party_call(control: ControlHandle, req: Request, me: mpsc::Sender<Msg>) -> IpcResult {
    let out = match control.request(req).await.map_err(control_error)? {
        Response::PartyCreated { party, invite } => IpcReply::Party {
            party,
            invite: Some(invite),
        },
        Response::Joined { party, renamed } => {
            if let Some(name) = renamed {
                let _ = me.send(Msg::Renamed(name)).await;
            }
            IpcReply::Party {
                party,
                invite: None,
            }
        }
        Response::Left { party } => IpcReply::Party {
            party,
            invite: None,
        },
        other => return Err(format!("unexpected reply {other:?}")),
    };
    if let Ok(Response::Parties { parties }) = control.request(Request::ListParties).await {
        let _ = me.send(Msg::Parties(parties)).await;
    }
    Ok(out)
}

async fn set_primary(engine: EngineHandle, peer: String, path: String) -> IpcResult {
    let id = peer_id(&engine, &peer).await?;
    let path: PathId = path.parse().map_err(|e| format!("{e}"))?;
    let (tx, rx) = oneshot::channel();
    engine.send(EngineCmd::SetPrimary(id, path, tx));
    rx.await
        .map_err(|_| "the data plane stopped".to_string())??;
    Ok(IpcReply::Ok)
}

async fn peer_id(engine: &EngineHandle, query: &str) -> Result<Key32, String> {
    let peers = engine.peers().await;
    let p = resolve_peer(&peers, query)?;
    p.peer_id.parse().map_err(|_| "bad peer id".to_string())
}

fn control_error(e: ControlError) -> String {
    match e {
        ControlError::Refused(reply) => reply.message,
        other => other.to_string(),
    }
}

/// `udp` while any relay is bound over UDP, `tcp` while relays are bound only over TLS/TCP.
fn relay_transport(paths: &[crate::conn::PathId]) -> Option<String> {
    use crate::conn::PathKind;
    let kinds: Vec<PathKind> = paths.iter().map(crate::conn::PathId::kind).collect();
    if kinds.contains(&PathKind::Relay) {
        Some("udp".into())
    } else if kinds.contains(&PathKind::RelayTcp) {
        Some("tcp".into())
    } else {
        None
    }
}
