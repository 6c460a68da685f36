//! The local control socket between the CLI and the daemon: one framed JSON request, one framed
//! JSON reply, per connection.

use std::net::Ipv4Addr;
use std::path::Path;

use rally_proto::control::{NatReport, PartyInfo};
use rally_proto::{frame, FrameDecoder};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::dataplane::PeerStatus;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum IpcRequest {
    Status,
    Peers,
    PartyCreate {
        name: String,
        max_uses: Option<u32>,
        expires_in_secs: Option<u64>,
    },
    PartyJoin {
        code: String,
    },
    PartyLeave {
        party: String,
    },
    PartyList,
    Netcheck,
    /// Event history; with `follow`, then every new event until the client hangs up.
    Events {
        follow: bool,
        types: Option<Vec<crate::events::EventType>>,
        peer: Option<String>,
    },
    PeerReconnect {
        peer: String,
    },
    SetPrimary {
        peer: String,
        path: String,
    },
    /// `rally discovery`.
    Discovery,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum IpcReply {
    Status(StatusReport),
    Peers {
        peers: Vec<PeerStatus>,
    },
    Party {
        party: PartyInfo,
        invite: Option<String>,
    },
    Parties {
        parties: Vec<PartyInfo>,
    },
    Netcheck(NatReport),
    Discovery(Box<crate::discovery::DiscoveryStatus>),
    Events {
        events: Vec<crate::events::Event>,
        /// Events this follower missed because it read too slowly.
        missed: u64,
    },
    Ok,
}

/// `rally status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub peer_id: String,
    pub virtual_ip: Option<Ipv4Addr>,
    pub control: ControlStatus,
    pub nat: serde_json::Value,
    pub parties: Vec<PartyInfo>,
    pub listen_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlStatus {
    pub connected: bool,
    pub addr: Option<String>,
    pub error: Option<String>,
}

pub type IpcResult = Result<IpcReply, String>;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("rally is not running (no daemon at {0}); start it with `rally up`")]
    NotRunning(String),
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad reply from the daemon: {0}")]
    Frame(#[from] rally_proto::FrameError),
}

/// Sends one request to the daemon listening at `socket` and returns its reply.
pub async fn call(socket: &Path, req: &IpcRequest) -> Result<IpcResult, IpcError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                IpcError::NotRunning(socket.display().to_string())
            }
            _ => IpcError::Io(e),
        })?;
    stream.write_all(&frame::encode(req)).await?;
    stream.shutdown().await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    Ok(frame::decode(&buf)?)
}

/// Reads one request from a CLI connection.
pub async fn read_request(stream: &mut UnixStream) -> Result<IpcRequest, IpcError> {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(req) = decoder.next_msg()? {
            return Ok(req);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(decoder
                .finish()
                .unwrap_or(rally_proto::FrameError::Truncated { need: 4, have: 0 })
                .into());
        }
        decoder.extend(&buf[..n]);
    }
}

pub async fn write_reply(stream: &mut UnixStream, reply: &IpcResult) -> Result<(), IpcError> {
    stream.write_all(&frame::encode(reply)).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Writes one reply frame without closing the stream (for streamed replies).
pub async fn write_frame(stream: &mut UnixStream, reply: &IpcResult) -> std::io::Result<()> {
    stream.write_all(&frame::encode(reply)).await
}

/// Whether the client of a streamed reply has hung up.
pub async fn peer_gone(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    match stream.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Sends a request whose reply is a stream of frames; `on_reply` returns false to stop.
pub async fn call_stream(
    socket: &Path,
    req: &IpcRequest,
    mut on_reply: impl FnMut(IpcResult) -> bool,
) -> Result<(), IpcError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                IpcError::NotRunning(socket.display().to_string())
            }
            _ => IpcError::Io(e),
        })?;
    stream.write_all(&frame::encode(req)).await?;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(reply) = decoder.next_msg::<IpcResult>()? {
            if !on_reply(reply) {
                return Ok(());
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return match decoder.finish() {
                Some(e) => Err(e.into()),
                None => Ok(()),
            };
        }
        decoder.extend(&buf[..n]);
    }
}

/// Finds a peer by name, virtual IP, peer id, or a unique prefix of the id (4+ characters).
pub fn resolve_peer<'a>(peers: &'a [PeerStatus], query: &str) -> Result<&'a PeerStatus, String> {
    if let Some(p) = peers
        .iter()
        .find(|p| p.name == query || p.virtual_ip.to_string() == query || p.peer_id == query)
    {
        return Ok(p);
    }
    let by_prefix: Vec<&PeerStatus> = if query.len() >= 4 {
        peers
            .iter()
            .filter(|p| p.peer_id.starts_with(query))
            .collect()
    } else {
        Vec::new()
    };
    match by_prefix.as_slice() {
        [p] => Ok(p),
        [] => Err(format!("no peer named {query:?} (see `rally peers`)")),
        _ => Err(format!(
            "{query:?} matches several peers; give more of the id"
        )),
    }
}
