//! `rally up`: the daemon. One owner ([`owner::Owner`]) holds the agent's state and runs one
//! loop over everything that can change it: CLI requests, control-plane events, data-plane
//! events, network changes, the relay-token timer and the stop signal. The CLI connections and
//! the metrics server are tasks that talk to it by messages; so are the short tasks the owner
//! starts to wait on the network, which answer with a message too.

mod backlog;
mod cli;
mod network;
mod owner;
mod requests;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::info;

use crate::api::{IpcReply, IpcRequest};
use crate::conn::Profile;
use crate::events::{EventBus, DEFAULT_HISTORY};
use crate::state::{ControlTarget, StateDir, StateError};
use owner::{Msg, Owner};

/// Messages waiting for the owner before senders wait their turn.
const INBOX: usize = 256;
/// How long the CLI connections get to write their last answers when the daemon stops.
const DRAIN: Duration = Duration::from_secs(1);

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub control: Option<ControlTarget>,
    pub name: String,
    pub listen_port: u16,
    pub tun_name: String,
    pub profile: Profile,
    /// Serve Prometheus text on this address.
    pub metrics: Option<SocketAddr>,
    /// LAN game discovery (`rally up --discovery …`).
    pub discovery: crate::discovery::DiscoveryConfig,
    /// An HTTP CONNECT proxy (`HOST:PORT`) for the control plane's TLS-over-TCP dial.
    pub proxy: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("a rally daemon is already running with state directory {0}")]
    AlreadyRunning(String),
    #[error("cannot listen on UDP port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("cannot create the control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on tcp {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create TUN device {name}: {reason} (rally needs root or CAP_NET_ADMIN)")]
    Tun { name: String, reason: String },
}

/// Runs the daemon until `rally down`, SIGINT/SIGTERM, or a fatal error. When it returns the
/// data plane has stopped, its TUN device is gone and the control socket is removed.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let state = StateDir::new(&cfg.state_dir);
    state.ensure()?;
    let keys = state.load_or_create_keys()?;
    let mut saved = state.load_saved()?;
    if let Some(t) = &cfg.control {
        if saved.control.as_ref() != Some(t) {
            saved.control = Some(t.clone());
            state.store_saved(&saved)?;
        }
    }

    let socket_path = state.socket_path();
    if tokio::net::UnixStream::connect(&socket_path).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(
            cfg.state_dir.display().to_string(),
        ));
    }
    let _ = std::fs::remove_file(&socket_path);
    let udp = bind_udp(cfg.listen_port)?;
    let metrics_listener = match cfg.metrics {
        Some(addr) => Some(
            crate::metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let listener = cli::bind(&socket_path)?;

    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
    let published = Arc::new(Notify::new());
    let mut bus = EventBus::new(DEFAULT_HISTORY);
    let waker = published.clone();
    bus.set_waker(move || waker.notify_waiters());
    let bus = Arc::new(Mutex::new(bus));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let server = cli::Server {
        inbox: inbox_tx.clone(),
        bus: bus.clone(),
        published,
        stopping: stopping_rx,
    };
    let accept = tokio::spawn(server.serve(listener, alive_tx));
    let metrics = metrics_listener.map(|l| tokio::spawn(serve_metrics(l, inbox_tx.clone())));

    let owner = Owner::new(cfg, state, keys, udp, bus, inbox_rx, inbox_tx);
    let (outcome, down) = owner.run(saved).await;

    let _ = std::fs::remove_file(&socket_path);
    accept.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    stopping_tx.send_replace(true);
    for reply in down {
        let _ = reply.send(Ok(IpcReply::Ok));
    }
    // Every connection task holds a sender: `recv` ends when the last one has finished.
    let _ = tokio::time::timeout(DRAIN, alive_rx.recv()).await;
    info!("rally agent stopped");
    outcome
}

/// The agent's one UDP socket.
fn bind_udp(port: u16) -> Result<std::net::UdpSocket, DaemonError> {
    std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|source| DaemonError::Udp { port, source })
}

/// The Prometheus endpoint: each scrape asks the owner for the peers and discovery's
/// counters, like `rally peers` and `rally discovery`.
async fn serve_metrics(listener: tokio::net::TcpListener, inbox: mpsc::Sender<Msg>) {
    crate::metrics::serve(listener, move || {
        let inbox = inbox.clone();
        async move {
            let mut text = match cli::ask(&inbox, IpcRequest::Peers).await {
                Ok(IpcReply::Peers { peers }) => crate::metrics::render(&peers),
                _ => crate::metrics::render(&[]),
            };
            if let Ok(IpcReply::Discovery(d)) = cli::ask(&inbox, IpcRequest::Discovery).await {
                crate::metrics::render_discovery(&mut text, &d.counters);
            }
            text
        }
    })
    .await
}
