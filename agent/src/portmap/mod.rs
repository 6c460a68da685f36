//! Port mapping on the gateway: asks the home router for an inbound mapping of the agent's one
//! UDP port (PCP, then NAT-PMP, then UPnP IGD), so peers can reach it at the mapped endpoint
//! even behind a NAT that maps each destination to a fresh port.
//!
//! [`schedule::Schedule`] decides when to map, renew and remove (sans-IO); [`client`] talks to
//! the gateway; [`PortMapper`] is the thin tokio task between them. It runs in the background
//! and never delays `rally up`: on a network without a mapping-capable gateway it costs a few
//! datagrams and gives up after a few retries until the network changes.

pub mod client;
pub mod gateway;
pub mod schedule;

use std::net::SocketAddrV4;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use schedule::{Action, Event, Schedule};

/// Which protocol made the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl Protocol {
    /// `pcp`, `nat-pmp` or `upnp`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// The mapping in effect, as `rally netcheck --json` and `rally status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMappingStatus {
    pub protocol: Protocol,
    /// The gateway's external address and the mapped port: a direct candidate.
    pub external: SocketAddrV4,
    /// The lease granted, in seconds.
    pub lifetime_s: u32,
}

/// One line for `rally status` and `rally netcheck`: `203.0.113.7:51820 (pcp, lease 7200 s)`
/// or `none`.
pub fn describe(status: Option<&PortMappingStatus>) -> String {
    match status {
        Some(s) => format!(
            "{} ({}, lease {} s)",
            s.external,
            s.protocol.label(),
            s.lifetime_s
        ),
        None => "none".into(),
    }
}

/// Why a mapping could not be made, renewed or removed.
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    #[error("no gateway: {0}")]
    NoGateway(String),
    #[error("the agent's UDP port is 0")]
    PortZero,
    #[error("{0}")]
    Refused(String),
}

enum Cmd {
    NetworkChanged,
    Shutdown(oneshot::Sender<()>),
}

/// The running port mapper of the agent's UDP port.
pub struct PortMapper {
    cmds: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<Option<PortMappingStatus>>,
}

impl PortMapper {
    /// Starts mapping UDP `port` in the background (the first request goes out at once).
    pub fn start(port: u16, seed: [u8; 32]) -> PortMapper {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (tx, status) = watch::channel(None);
        let schedule = Schedule::new(schedule::RETRY, seed);
        tokio::spawn(run(port, schedule, rx, tx));
        PortMapper { cmds, status }
    }

    /// The mapping in effect now, if any.
    pub fn status(&self) -> Option<PortMappingStatus> {
        *self.status.borrow()
    }

    /// A receiver that sees every change of [`PortMapper::status`].
    pub fn subscribe(&self) -> watch::Receiver<Option<PortMappingStatus>> {
        self.status.clone()
    }

    /// The host's addresses or routes changed: remove the old mapping and map again.
    pub fn network_changed(&self) {
        let _ = self.cmds.send(Cmd::NetworkChanged);
    }

    /// Removes the mapping from the gateway and stops, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Shutdown(tx)).is_err() {
            return;
        }
        if tokio::time::timeout(within, rx).await.is_err() {
            warn!("the port mapping was not removed in time; the gateway drops it when its lease ends");
        }
    }
}

/// The driver: performs the schedule's actions, feeds back their outcomes, sleeps until its
/// next deadline or command.
async fn run(
    port: u16,
    mut schedule: Schedule,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    status: watch::Sender<Option<PortMappingStatus>>,
) {
    let mut held: Option<client::Held> = None;
    // Set once shutting down, with who waits for the removal (if anyone).
    let mut stop: Option<Option<oneshot::Sender<()>>> = None;
    loop {
        while let Some(action) = schedule.poll_action() {
            let came = if action == Action::Map && stop.is_none() {
                map_unless_stopped(port, &mut held, &mut schedule, &mut cmds).await
            } else {
                perform(action, port, &mut held, &mut schedule).await;
                Vec::new()
            };
            status.send_if_modified(|s| {
                let now = held.as_ref().map(client::Held::status);
                let changed = *s != now;
                *s = now;
                changed
            });
            for cmd in came {
                apply(cmd, &mut schedule, &mut stop);
            }
        }
        while let Some(event) = schedule.poll_event() {
            match event {
                Event::Expired => {
                    warn!(
                        port,
                        "the port mapping's lease ran out before it could be renewed"
                    );
                    held = None;
                    status.send_replace(None);
                }
                Event::GaveUp => {
                    info!(
                        port,
                        "no port mapping on this network (gave up until it changes)"
                    )
                }
            }
        }
        if let Some(done) = stop {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
        let deadline = schedule.poll_timeout();
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(to_tokio(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = cmds.recv() => apply(cmd, &mut schedule, &mut stop),
            () = sleep => {
                if let Some((_, timer)) = deadline {
                    debug!(?timer, "port mapping timer");
                }
                schedule.handle_timeout(now());
            }
        }
    }
}

/// A command from the daemon (`None`: it dropped its handle, which stops the mapper too).
fn apply(
    cmd: Option<Cmd>,
    schedule: &mut Schedule,
    stop: &mut Option<Option<oneshot::Sender<()>>>,
) {
    match cmd {
        Some(Cmd::NetworkChanged) => schedule.handle_network_change(now()),
        Some(Cmd::Shutdown(tx)) => {
            schedule.handle_shutdown();
            *stop = Some(Some(tx));
        }
        None => {
            schedule.handle_shutdown();
            *stop = Some(None);
        }
    }
}

/// A `Map`, which can wait seconds on a gateway that never answers, gives way to a shutdown
/// so `rally down` does not wait for it (a mapping the gateway grants after that is not known
/// here and ends with its lease, as when the agent is killed). Returns the commands that came
/// meanwhile, in order: network changes are applied after the map's outcome.
async fn map_unless_stopped(
    port: u16,
    held: &mut Option<client::Held>,
    schedule: &mut Schedule,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Vec<Option<Cmd>> {
    let mut came = Vec::new();
    let work = perform(Action::Map, port, held, schedule);
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => return came,
            cmd = cmds.recv() => {
                let stops = !matches!(cmd, Some(Cmd::NetworkChanged));
                came.push(cmd);
                if stops {
                    return came;
                }
            }
        }
    }
}

async fn perform(
    action: Action,
    port: u16,
    held: &mut Option<client::Held>,
    schedule: &mut Schedule,
) {
    match action {
        Action::Map => match client::map(port).await {
            Ok(new) => {
                let s = new.status();
                info!(
                    protocol = s.protocol.label(),
                    external = %s.external,
                    lifetime_s = s.lifetime_s,
                    "port mapped on the gateway"
                );
                schedule.handle_granted(new.lifetime(), now());
                *held = Some(new);
            }
            Err(e) => {
                debug!(port, "no port mapping: {e}");
                schedule.handle_failed(now());
            }
        },
        Action::Renew => {
            let Some(h) = held.as_mut() else {
                schedule.handle_failed(now());
                return;
            };
            match client::renew(h).await {
                Ok(()) => schedule.handle_granted(h.lifetime(), now()),
                Err(e) => {
                    warn!(port, "renewing the port mapping failed: {e}");
                    schedule.handle_failed(now());
                }
            }
        }
        Action::Remove => {
            let Some(h) = held.take() else {
                return;
            };
            let external = h.status().external;
            match client::remove(h).await {
                Ok(()) => info!(%external, "port mapping removed from the gateway"),
                Err(e) => warn!(%external, "removing the port mapping failed: {e}"),
            }
        }
    }
}

/// The schedule's clock, read through tokio's (so paused-time tests drive it).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

fn to_tokio(at: std::time::Instant) -> Instant {
    Instant::from_std(at)
}
