//! The local control socket between the CLI and the daemon: one framed JSON request, one framed
//! JSON reply, per connection.

use std::path::Path;

use rally_proto::{frame, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::api::{IpcReply, IpcRequest, IpcResult};

/// Bytes of a reply the daemon sent that are quoted when the reply cannot be read.
const QUOTE_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("rally is not running (no daemon at {0}); start it with `rally up`")]
    NotRunning(String),
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad reply from the daemon: {0}")]
    Frame(#[from] rally_proto::FrameError),
    #[error("the daemon closed the connection without an answer (see its log)")]
    NoReply,
    /// A reply this CLI cannot read: shows what the daemon said.
    #[error("bad reply from the daemon ({reason}; is it another version of rally?): {said}")]
    Unreadable { reason: String, said: String },
}

/// Sends one request to the daemon listening at `socket` and returns its reply.
pub async fn call(socket: &Path, req: &IpcRequest) -> Result<IpcResult, IpcError> {
    let mut stream = connect(socket).await?;
    stream.write_all(&frame::encode(req)).await?;
    stream.shutdown().await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    if buf.is_empty() {
        return Err(IpcError::NoReply);
    }
    let value: serde_json::Value = frame::decode(&buf)?;
    decode_reply(value)
}

/// Reads a reply frame's JSON: the daemon's own error as it is, a reply this CLI does not
/// know with the daemon's words quoted.
pub fn decode_reply(value: serde_json::Value) -> Result<IpcResult, IpcError> {
    if let Some(err) = value.get("Err").and_then(serde_json::Value::as_str) {
        return Ok(Err(err.to_owned()));
    }
    serde_json::from_value(value.clone()).map_err(|e| {
        let mut said = value.to_string();
        if said.len() > QUOTE_LEN {
            let mut end = QUOTE_LEN;
            while !said.is_char_boundary(end) {
                end -= 1;
            }
            said.truncate(end);
            said.push('…');
        }
        IpcError::Unreadable {
            reason: e.to_string(),
            said,
        }
    })
}

/// The error for a reply of the wrong kind (e.g. `ok` where a status was asked for).
pub fn unexpected(reply: &IpcReply) -> String {
    format!(
        "unexpected {:?} reply from the daemon (is it another version of rally?)",
        reply.kind()
    )
}

async fn connect(socket: &Path) -> Result<UnixStream, IpcError> {
    UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                IpcError::NotRunning(socket.display().to_string())
            }
            _ => IpcError::Io(e),
        })
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

/// Whether the client of a streamed reply has hung up. Anything it sent after its request is
/// read and ignored.
pub async fn peer_gone(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// Sends a request whose reply is a stream of frames; `on_reply` returns false to stop.
pub async fn call_stream(
    socket: &Path,
    req: &IpcRequest,
    mut on_reply: impl FnMut(IpcResult) -> bool,
) -> Result<(), IpcError> {
    let mut stream = connect(socket).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_error_is_shown() {
        let said = serde_json::json!({"Err": "no peer named \"zed\""});
        let shown = decode_reply(said).unwrap();
        assert!(
            matches!(&shown, Err(e) if e == "no peer named \"zed\""),
            "{shown:?}"
        );
    }

    #[test]
    fn an_unknown_reply_quotes_the_daemon() {
        let said = serde_json::json!({"Ok": {"reply": "teleport", "to": "mars"}});
        let err = decode_reply(said).unwrap_err().to_string();
        assert!(err.contains("teleport") && err.contains("mars"), "{err}");
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn a_known_reply_decodes() {
        let said = serde_json::to_value(IpcResult::Ok(IpcReply::Ok)).unwrap();
        assert!(matches!(decode_reply(said), Ok(Ok(IpcReply::Ok))));
    }
}
