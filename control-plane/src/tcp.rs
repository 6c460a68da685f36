//! The control protocol over TLS 1.3 on TCP, for agents on networks that block UDP: the same
//! certificate (so the same pinned key), the same framing and the same sessions as over QUIC
//! ([`Server::serve_session`]); only the transport differs. Connection caps are shared with
//! QUIC (one count per source address across both).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rally_proto::identity::REGISTER_EXPORTER_LABEL;
use rally_proto::Key32;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::server::Server;

/// How long a client has for the TCP + TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Server {
    /// Accepts TLS-over-TCP connections on `listener` until it fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, tls: rustls::ServerConfig) {
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    debug!("tcp accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = self.admit(remote.ip()) else {
                self.connections_refused.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, "tcp connection refused: over the connection cap");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let binding = tls
                            .get_ref()
                            .1
                            .export_keying_material([0u8; 32], REGISTER_EXPORTER_LABEL, None)
                            .ok()
                            .map(Key32);
                        let (recv, send) = tokio::io::split(tls);
                        let mut send = server.serve_session(remote, binding, recv, send).await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), send.shutdown()).await;
                    }
                    Ok(Err(e)) => debug!(%remote, "tls handshake failed: {e}"),
                    Err(_) => debug!(%remote, "tls handshake timed out"),
                }
                drop(slot);
            });
        }
    }
}
