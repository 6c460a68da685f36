//! A small HTTP CONNECT proxy (`rally-lab connect-proxy`), for agents on a network that lets out
//! nothing but a proxy. It prints one `CONNECT <target>` line per tunnel it opens.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{bins, wait_until, Host, Proc};

const LISTENING: &str = "connect-proxy listening";
/// The longest request header read.
const MAX_HEADER: usize = 8 * 1024;

/// Serves until killed.
pub fn serve(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        println!("{LISTENING} on {listen}");
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = tunnel(client).await {
                    println!("tunnel failed: {e:#}");
                }
            });
        }
    })
}

async fn tunnel(mut client: TcpStream) -> Result<()> {
    let mut header = Vec::new();
    while !header.ends_with(b"\r\n\r\n") {
        if header.len() >= MAX_HEADER {
            bail!("request header over {MAX_HEADER} bytes");
        }
        header.push(client.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&header);
    let target = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|l| l.split(' ').next())
        .context("not a CONNECT request")?
        .to_owned();
    let mut upstream = match TcpStream::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                .await?;
            bail!("connecting to {target}: {e}");
        }
    };
    println!("CONNECT {target}");
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// A running `rally-lab connect-proxy`.
pub struct ConnectProxy {
    proc: Proc,
    addr: SocketAddr,
}

impl ConnectProxy {
    /// Starts one on `host` at `port` and waits until it listens.
    pub fn start(host: &Host, port: u16) -> Result<ConnectProxy> {
        let addr = SocketAddr::from((host.ip(), port));
        let bin = bins::rally_lab()?;
        let proc = host.spawn(
            &[
                bin.to_string_lossy().as_ref(),
                "connect-proxy",
                "--listen",
                &addr.to_string(),
            ],
            host.log_path("connect-proxy"),
        )?;
        wait_until(
            "the CONNECT proxy to listen",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if !proc.is_running() {
                    bail!(
                        "connect-proxy exited:\n{}",
                        proc.log_text().unwrap_or_default()
                    );
                }
                Ok(proc.log_text()?.contains(LISTENING))
            },
        )?;
        Ok(ConnectProxy { proc, addr })
    }

    /// `http://IP:PORT`, for `--proxy`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The targets of the tunnels it opened.
    pub fn tunnels(&self) -> Result<Vec<String>> {
        Ok(self
            .proc
            .log_text()?
            .lines()
            .filter_map(|l| l.strip_prefix("CONNECT "))
            .map(str::to_owned)
            .collect())
    }
}
