//! One control channel connection, over QUIC or TLS 1.3 on TCP: the race between them, and
//! the background check that QUIC answers again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rally_proto::identity::REGISTER_EXPORTER_LABEL;
use rally_proto::Key32;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::client::{ControlTransport, CONNECT_TIMEOUT};

/// How long one background QUIC attempt may take.
const UDP_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub(super) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// One connected control channel: a byte stream each way, over QUIC or TLS/TCP.
pub(super) struct Link {
    pub(super) transport: ControlTransport,
    pub(super) recv: BoxRead,
    pub(super) send: BoxWrite,
    /// The QUIC connection, to close it when the session ends.
    pub(super) quic: Option<quinn::Connection>,
    /// The connection's channel binding ([`REGISTER_EXPORTER_LABEL`]).
    pub(super) binding: Option<Key32>,
}

impl Link {
    /// Races QUIC against TLS over TCP; the first to connect wins. Errors name both causes.
    ///
    /// The TCP connection (or the proxy's tunnel) is opened at once, alongside QUIC, but TLS
    /// starts only `head_start` later (or at once when QUIC fails first): on an open network
    /// QUIC wins and the server saw a bare TCP handshake, never a TLS one; where UDP is
    /// blocked, the TCP round trip is already behind when the head start runs out.
    pub(super) async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        key: Key32,
        proxy: Option<&str>,
        head_start: Duration,
    ) -> Result<Link, String> {
        let quic = Link::quic(endpoint, addr, key);
        let (quic_failed_tx, quic_failed) = oneshot::channel::<()>();
        let tcp = async {
            let started = tokio::time::Instant::now();
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tcp_connect(addr, proxy))
                .await
                .map_err(|_| format!("no answer from tcp {addr}"))??;
            let connected = started.elapsed();
            let _ = tokio::time::timeout(head_start.saturating_sub(connected), quic_failed).await;
            debug!(
                control = %addr,
                tcp_connect_ms = connected.as_millis(),
                "QUIC has not answered: TLS over TCP"
            );
            Link::tls(stream, addr, key).await
        };
        tokio::pin!(quic, tcp);
        let mut quic_failed_tx = Some(quic_failed_tx);
        let mut quic_err: Option<String> = None;
        let mut tcp_err: Option<String> = None;
        loop {
            tokio::select! {
                r = &mut quic, if quic_err.is_none() => match r {
                    Ok(link) => return Ok(link),
                    Err(e) => {
                        if let Some(tx) = quic_failed_tx.take() {
                            let _ = tx.send(());
                        }
                        quic_err = Some(e);
                    }
                },
                r = &mut tcp, if tcp_err.is_none() => match r {
                    Ok(link) => {
                        warn!(control = %addr, "UDP seems blocked: using TCP for the control plane");
                        return Ok(link);
                    }
                    Err(e) => tcp_err = Some(e),
                },
            }
            if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                return Err(format!("QUIC: {q}; TLS over TCP: {t}"));
            }
        }
    }

    async fn quic(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        key: Key32,
    ) -> Result<Link, String> {
        let config = super::tls::client_config(key).map_err(|e| e.to_string())?;
        let connecting = endpoint
            .connect_with(config, addr, super::tls::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer from {addr}"))?
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut binding = [0u8; 32];
        let binding = conn
            .export_keying_material(&mut binding, REGISTER_EXPORTER_LABEL, b"")
            .ok()
            .map(|()| Key32(binding));
        Ok(Link {
            transport: ControlTransport::Quic,
            recv: Box::new(recv),
            send: Box::new(send),
            quic: Some(conn),
            binding,
        })
    }

    async fn tls(
        stream: tokio::net::TcpStream,
        addr: SocketAddr,
        key: Key32,
    ) -> Result<Link, String> {
        let config = super::tls::rustls_config(key).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream);
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| format!("no answer from tcp {addr}"))?
            .map_err(|e| format!("tls with tcp {addr}: {e}"))?;
        let binding = tls
            .get_ref()
            .1
            .export_keying_material([0u8; 32], REGISTER_EXPORTER_LABEL, None)
            .ok()
            .map(Key32);
        let (recv, send) = tokio::io::split(tls);
        Ok(Link {
            transport: ControlTransport::Tcp,
            recv: Box::new(recv),
            send: Box::new(send),
            quic: None,
            binding,
        })
    }
}

/// A TCP stream to `addr` (through the HTTP CONNECT proxy when one is set), `TCP_NODELAY`.
async fn tcp_connect(
    addr: SocketAddr,
    proxy: Option<&str>,
) -> Result<tokio::net::TcpStream, String> {
    let stream = match proxy {
        Some(proxy) => super::proxy::connect(proxy, addr).await?,
        None => tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to tcp {addr}: {e}"))?,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Whether a QUIC handshake with the control plane completes now (the connection is closed
/// again at once).
pub(super) async fn quic_answers(endpoint: &quinn::Endpoint, addr: SocketAddr, key: Key32) -> bool {
    let Ok(config) = super::tls::client_config(key) else {
        return false;
    };
    let Ok(connecting) = endpoint.connect_with(config, addr, super::tls::SERVER_NAME) else {
        return false;
    };
    match tokio::time::timeout(UDP_PROBE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"probe");
            true
        }
        _ => false,
    }
}
