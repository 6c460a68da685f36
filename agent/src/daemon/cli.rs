//! The control socket the CLI talks to: one task per connection, which hands its request to
//! the owner and writes back the answer; `rally events` streams from the event bus.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, warn};

use super::owner::Msg;
use super::DaemonError;
use crate::api::{resolve_peer, IpcReply, IpcRequest, IpcResult};
use crate::events::{EventBus, EventFilter, EventType, Item};
use crate::ipc;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of descriptors) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Creates the control socket with mode 0600 from the start: it is bound under a umask that
/// leaves no permission to group and others, so there is no moment where they may connect.
pub(super) fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let failed = |source| DaemonError::Socket {
        path: path.display().to_string(),
        source,
    };
    // SAFETY: umask(2) cannot fail and touches no memory. It is process-wide: a file another
    // thread creates meanwhile only gets fewer permissions, never more.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound.map_err(failed)
}

/// What every connection task needs.
#[derive(Clone)]
pub(super) struct Server {
    pub(super) inbox: mpsc::Sender<Msg>,
    pub(super) bus: Arc<Mutex<EventBus>>,
    /// Notified after every publish that queued an event for a follower.
    pub(super) published: Arc<Notify>,
    /// Becomes true when the daemon stops: followers of `rally events` end.
    pub(super) stopping: watch::Receiver<bool>,
}

impl Server {
    /// Accepts connections until aborted. Each connection task holds a clone of `alive`, so
    /// the daemon can wait for the last answers to be written.
    pub(super) async fn serve(self, listener: UnixListener, alive: mpsc::Sender<()>) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().connection(stream, alive.clone()));
                }
                Err(e) => {
                    warn!("control socket: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    async fn connection(self, mut stream: UnixStream, _alive: mpsc::Sender<()>) {
        let request = tokio::time::timeout(REQUEST_TIMEOUT, ipc::read_request(&mut stream)).await;
        let reply = match request {
            Ok(Ok(IpcRequest::Events {
                follow,
                types,
                peer,
            })) => {
                self.stream_events(&mut stream, follow, types, peer).await;
                return;
            }
            Ok(Ok(req)) => ask(&self.inbox, req).await,
            Ok(Err(e)) => Err(format!("bad request: {e}")),
            Err(_) => Err("no request within 5 s".into()),
        };
        if let Err(e) = ipc::write_reply(&mut stream, &reply).await {
            debug!("control socket: cannot answer: {e}");
        }
    }

    /// `rally events`: the history, then (following) new events as they come, a frame for
    /// what each wake-up finds, until the client hangs up or the daemon stops. A follower
    /// sleeps until an event is published for it.
    async fn stream_events(
        mut self,
        stream: &mut UnixStream,
        follow: bool,
        types: Option<Vec<EventType>>,
        peer: Option<String>,
    ) {
        let filter = EventFilter {
            types: types.map(|t| t.into_iter().collect()),
            peer: match peer {
                Some(p) => Some(self.peer_name(&p).await.unwrap_or(p)),
                None => None,
            },
        };
        let (history, sub) = {
            let mut bus = self.bus.lock().unwrap_or_else(|e| e.into_inner());
            let sub = follow.then(|| bus.subscribe(filter.clone()));
            (bus.history(&filter), sub)
        };
        let first: IpcResult = Ok(IpcReply::Events {
            events: history,
            missed: 0,
        });
        if ipc::write_frame(stream, &first).await.is_err() {
            return;
        }
        let Some(sub) = sub else {
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
            return;
        };
        loop {
            // Registered before the bus is read, so a publish in between still wakes it.
            let published = self.published.notified();
            let items = self
                .bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll(sub)
                .unwrap_or_default();
            let mut events = Vec::new();
            let mut missed = 0;
            for item in items {
                match item {
                    Item::Event(e) => events.push(e),
                    Item::Lagged { missed: m } => missed += m,
                }
            }
            if !events.is_empty() || missed > 0 {
                let frame: IpcResult = Ok(IpcReply::Events { events, missed });
                if ipc::write_frame(stream, &frame).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                () = published => {}
                // The client sends nothing after its request: readable means it hung up.
                _ = stream.readable() => {
                    if ipc::peer_gone(stream).await {
                        break;
                    }
                }
                () = stopped(&mut self.stopping) => break,
            }
        }
        self.bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsubscribe(sub);
    }

    /// The name events carry for a peer given as name, virtual IP or id.
    async fn peer_name(&self, query: &str) -> Option<String> {
        let Ok(IpcReply::Peers { peers }) = ask(&self.inbox, IpcRequest::Peers).await else {
            return None;
        };
        resolve_peer(&peers, query).ok().map(|p| p.name.clone())
    }
}

/// Returns once the daemon is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Hands a request to the owner and waits for its answer.
pub(super) async fn ask(inbox: &mpsc::Sender<Msg>, req: IpcRequest) -> IpcResult {
    let (tx, rx) = oneshot::channel();
    if inbox.send(Msg::Request(req, tx)).await.is_err() {
        return Err("the daemon is stopping".into());
    }
    rx.await
        .unwrap_or_else(|_| Err("the daemon is stopping".into()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn the_control_socket_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rally.sock");
        // SAFETY: umask(2) cannot fail; a permissive one shows the socket does not depend on it.
        let old = unsafe { libc::umask(0) };
        let bound = bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let _listener = bound.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
