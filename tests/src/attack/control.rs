//! A control-protocol client that does what a real agent would not: registers throwaway
//! identities, claims other agents' WireGuard keys, sends oversized reports and frames, holds
//! connections open. It speaks the real protocol: QUIC (or TLS over TCP) with the agent's own
//! key pinning ([`rally_agent::control::tls`]), length-prefixed JSON frames
//! ([`rally_proto::frame`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rally_agent::control::tls;
use rally_proto::identity::{register_transcript, DOMAIN_REGISTER};
use rally_proto::{
    frame, ClientMsg, ErrorReply, FrameDecoder, Identity, Key32, PeerInfo, Request, Response,
    ServerMsg, Sig64, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long the client waits for any one answer.
pub const ANSWER: Duration = Duration::from_secs(10);

/// One connection to the control plane with its control stream: a QUIC stream, or TLS over
/// TCP.
pub struct ControlClient {
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
    send: Box<dyn AsyncWrite + Unpin + Send>,
    recv: Box<dyn AsyncRead + Unpin + Send>,
    decoder: FrameDecoder,
    next_id: u64,
}

/// What registering got.
#[derive(Debug)]
pub struct Registered {
    pub name: String,
    pub virtual_ip: Ipv4Addr,
}

impl ControlClient {
    /// Connects (pinning `key`) and opens the control stream. Needs a tokio runtime.
    pub async fn connect(addr: SocketAddr, key: Key32) -> Result<ControlClient> {
        let conn_and_endpoint = Self::handshake(addr, key).await?;
        let (endpoint, conn) = conn_and_endpoint;
        let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
        Ok(ControlClient {
            quic: Some((endpoint, conn)),
            send: Box::new(send),
            recv: Box::new(recv),
            decoder: FrameDecoder::new(),
            next_id: 1,
        })
    }

    /// Connects over TLS 1.3 on TCP (pinning `key`), as an agent on a UDP-blocked network does.
    pub async fn connect_tcp(addr: SocketAddr, key: Key32) -> Result<ControlClient> {
        let config = tls::rustls_config(key).map_err(|e| anyhow!("tls: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)?;
        let connect = async {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await
        };
        let stream = tokio::time::timeout(ANSWER, connect)
            .await
            .map_err(|_| anyhow!("no TLS handshake with tcp {addr} within {ANSWER:?}"))?
            .with_context(|| format!("connecting to tcp {addr}"))?;
        let (recv, send) = tokio::io::split(stream);
        Ok(ControlClient {
            quic: None,
            send: Box::new(send),
            recv: Box::new(recv),
            decoder: FrameDecoder::new(),
            next_id: 1,
        })
    }

    /// Only the QUIC handshake: `Err` if the control plane refused or dropped the connection.
    pub async fn handshake(
        addr: SocketAddr,
        key: Key32,
    ) -> Result<(quinn::Endpoint, quinn::Connection)> {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let config = tls::client_config(key).map_err(|e| anyhow!("tls: {e}"))?;
        let connecting = endpoint.connect_with(config, addr, tls::SERVER_NAME)?;
        let conn = tokio::time::timeout(ANSWER, connecting)
            .await
            .map_err(|_| anyhow!("no handshake with {addr} within {ANSWER:?}"))?
            .with_context(|| format!("connecting to {addr}"))?;
        Ok((endpoint, conn))
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        self.send_raw(&frame::encode(msg)).await
    }

    /// Sends bytes as they are (e.g. a frame header announcing a huge body).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes).await.context("writing")?;
        self.send.flush().await.context("writing")?;
        Ok(())
    }

    /// Writes `frame` over and over without reading anything, until a write makes no progress
    /// for `stall` (the control plane stopped reading) or `max` frames went out. Returns how
    /// many went out.
    pub async fn flood_without_reading(
        &mut self,
        frame: &[u8],
        max: usize,
        stall: Duration,
    ) -> Result<usize> {
        for sent in 0..max {
            match tokio::time::timeout(stall, self.send.write_all(frame)).await {
                Ok(r) => r.context("writing")?,
                Err(_) => return Ok(sent),
            }
        }
        Ok(max)
    }

    /// The next message from the control plane.
    pub async fn recv(&mut self) -> Result<ServerMsg> {
        loop {
            if let Some(m) = self.decoder.next_msg::<ServerMsg>()? {
                return Ok(m);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = tokio::time::timeout(ANSWER, self.recv.read(&mut buf))
                .await
                .map_err(|_| anyhow!("no message within {ANSWER:?}"))?
                .context("reading")?;
            if n == 0 {
                bail!("the control plane closed the stream");
            }
            self.decoder.extend(&buf[..n]);
        }
    }

    /// Hello, challenge, signed registration. `Ok(Err(reply))` if the control plane refused.
    pub async fn register(
        &mut self,
        identity: &Identity,
        name: &str,
        wg_key: Key32,
    ) -> Result<Result<Registered, ErrorReply>> {
        let id = identity.public();
        self.send(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            identity: id,
        })
        .await?;
        let nonce = match self.recv().await? {
            ServerMsg::Challenge { nonce } => nonce,
            ServerMsg::Error(e) => return Ok(Err(e)),
            other => bail!("expected a challenge, got {other:?}"),
        };
        let transcript = register_transcript(&nonce, &id, &wg_key, name);
        self.send(&ClientMsg::Register {
            name: name.to_owned(),
            wg_key,
            endpoints: vec![],
            signature: Sig64(identity.sign(DOMAIN_REGISTER, &transcript)),
        })
        .await?;
        match self.recv().await? {
            ServerMsg::Registered {
                name, virtual_ip, ..
            } => Ok(Ok(Registered { name, virtual_ip })),
            ServerMsg::Error(e) => Ok(Err(e)),
            other => bail!("expected registered, got {other:?}"),
        }
    }

    /// Sends a request and returns its answer, skipping pushes meanwhile.
    pub async fn request(&mut self, body: Request) -> Result<Result<Response, ErrorReply>> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientMsg::Request { id, body }).await?;
        loop {
            match self.recv().await? {
                ServerMsg::Response { id: got, result } if got == id => return Ok(result),
                ServerMsg::Error(e) => return Ok(Err(e)),
                _ => {}
            }
        }
    }

    /// Waits for the next full peer map (pages assembled), skipping other pushes.
    pub async fn peer_map(&mut self) -> Result<Vec<PeerInfo>> {
        let mut pages = rally_proto::MapPages::new();
        loop {
            match self.recv().await? {
                ServerMsg::PeerPage { version, peers } => pages.handle_page(version, peers)?,
                ServerMsg::PeerMap { version, peers } => {
                    return Ok(pages.handle_map(version, peers)?)
                }
                _ => {}
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        match self.quic {
            Some((endpoint, conn)) => {
                conn.close(0u32.into(), b"done");
                endpoint.wait_idle().await;
            }
            None => {
                let _ = self.send.shutdown().await;
            }
        }
    }
}

/// Runs `f` on a fresh single-threaded tokio runtime inside lab namespace `ns`.
pub fn in_ns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send,
) -> Result<T> {
    crate::netns::in_ns(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
}

/// A throwaway identity from a number.
pub fn identity(n: u32) -> Identity {
    let mut seed = [0x5a; 32];
    seed[..4].copy_from_slice(&n.to_be_bytes());
    Identity::from_seed(seed)
}

/// A throwaway WireGuard public key from a number.
pub fn wg_key(n: u32) -> Key32 {
    let mut k = [0xa5; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    Key32(k)
}
