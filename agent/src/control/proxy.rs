//! TCP dials through an HTTP CONNECT proxy (`--proxy`, `HTTPS_PROXY`), for networks that let
//! nothing out but a proxy. Only plain `http://HOST:PORT` proxies without credentials.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use rally_proto::proxy::{check_reply, parse_proxy, ProxyError, MAX_REPLY};

/// A TCP stream to `target` through the proxy at `proxy` (`HOST:PORT`).
pub async fn connect(proxy: &str, target: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("cannot connect to the proxy {proxy}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("proxy {proxy}: {e}"))?;
    // Byte by byte up to the blank line: nothing past the header may be consumed (the TLS
    // handshake follows on the same stream).
    let mut header = Vec::with_capacity(256);
    while !header.ends_with(b"\r\n\r\n") {
        if header.len() >= MAX_REPLY {
            return Err(format!("proxy {proxy}: {}", ProxyError::TooLong));
        }
        let byte = stream
            .read_u8()
            .await
            .map_err(|e| format!("proxy {proxy}: {e}"))?;
        header.push(byte);
    }
    check_reply(&header).map_err(|e| format!("proxy {proxy}: {e}"))?;
    Ok(stream)
}
