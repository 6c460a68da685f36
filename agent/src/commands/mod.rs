//! The client commands of the `rally` binary (a module of the binary, not of the library):
//! each sends one request to the daemon over its control socket and prints the answer.

mod print;
mod why;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rally_agent::api::{resolve_peer, IpcReply, IpcRequest, PeerStatus};
use rally_agent::events::EventType;
use rally_agent::ipc::{self, unexpected};

use crate::{Cmd, PartyCmd, PathCmd, PeerCmd};
use print::{describe_path, print_parties, print_peers};

/// Runs one client command on a small runtime of its own.
pub(crate) fn run(state_dir: &Path, cmd: Cmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(dispatch(state_dir, cmd))
}

async fn dispatch(state_dir: &Path, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up(_) => bail!("`rally up` runs the daemon, not a client command"),
        Cmd::Down => {
            call(state_dir, IpcRequest::Down).await?;
            println!("rally stopped");
        }
        Cmd::Party(PartyCmd::Create {
            name,
            max_uses,
            expires,
        }) => party_create(state_dir, name, max_uses, expires).await?,
        Cmd::Party(PartyCmd::Join { code }) => party_join(state_dir, code).await?,
        Cmd::Party(PartyCmd::Leave { party }) => party_leave(state_dir, party).await?,
        Cmd::Party(PartyCmd::List { json }) => party_list(state_dir, json).await?,
        Cmd::Status { json } => status(state_dir, json).await?,
        Cmd::Peers { json } => {
            let peers = peers(state_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                print_peers(&peers);
            }
        }
        Cmd::Events {
            follow,
            types,
            peer,
            json,
        } => events(state_dir, follow, types, peer, json).await?,
        Cmd::Metrics { json } => metrics(state_dir, json).await?,
        Cmd::Peer(PeerCmd::Reconnect { peer }) => {
            call(state_dir, IpcRequest::PeerReconnect { peer: peer.clone() }).await?;
            println!("reconnecting to {peer}");
        }
        Cmd::Peer(PeerCmd::Why { peer }) => why::peer_why(state_dir, &peer).await?,
        Cmd::Path(PathCmd::SetPrimary { peer, path }) => set_primary(state_dir, peer, path).await?,
        Cmd::Netcheck { json } => netcheck(state_dir, json).await?,
        Cmd::Discovery { json } => discovery(state_dir, json).await?,
        Cmd::Ping {
            peer,
            count,
            interval,
        } => ping(state_dir, &peer, count, interval).await?,
    }
    Ok(())
}

async fn call(state_dir: &Path, req: IpcRequest) -> Result<IpcReply> {
    let socket = state_dir.join("rally.sock");
    ipc::call(&socket, &req).await?.map_err(|e| anyhow!(e))
}

async fn party_create(
    state_dir: &Path,
    name: String,
    max_uses: Option<u32>,
    expires: Option<u64>,
) -> Result<()> {
    let reply = call(
        state_dir,
        IpcRequest::PartyCreate {
            name,
            max_uses,
            expires_in_secs: expires,
        },
    )
    .await?;
    let IpcReply::Party {
        party,
        invite: Some(invite),
    } = reply
    else {
        bail!(unexpected(&reply));
    };
    eprintln!("party {} created; share this invite code:", party.name);
    println!("{invite}");
    Ok(())
}

async fn party_join(state_dir: &Path, code: String) -> Result<()> {
    let reply = call(state_dir, IpcRequest::PartyJoin { code }).await?;
    let IpcReply::Party { party, .. } = reply else {
        bail!(unexpected(&reply));
    };
    println!("joined party {} ({} members)", party.name, party.members);
    Ok(())
}

async fn party_leave(state_dir: &Path, party: String) -> Result<()> {
    let reply = call(state_dir, IpcRequest::PartyLeave { party }).await?;
    let IpcReply::Party { party, .. } = reply else {
        bail!(unexpected(&reply));
    };
    println!("left party {}", party.name);
    Ok(())
}

async fn party_list(state_dir: &Path, json: bool) -> Result<()> {
    let reply = call(state_dir, IpcRequest::PartyList).await?;
    let IpcReply::Parties { parties } = reply else {
        bail!(unexpected(&reply));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&parties)?);
    } else {
        print_parties(&parties);
    }
    Ok(())
}

async fn status(state_dir: &Path, json: bool) -> Result<()> {
    let reply = call(state_dir, IpcRequest::Status).await?;
    let IpcReply::Status(s) = reply else {
        bail!(unexpected(&reply));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("name:        {}", s.name);
        println!("peer id:     {}", s.peer_id);
        println!(
            "virtual IP:  {}",
            s.virtual_ip
                .map_or("(not assigned yet)".into(), |ip| ip.to_string())
        );
        println!("UDP port:    {}", s.listen_port);
        println!(
            "port mapping: {}",
            rally_agent::portmap::describe(s.port_mapping.as_ref())
        );
        let control = match (&s.control.addr, s.control.connected) {
            (None, _) => "none (join a party with an invite code)".to_string(),
            (Some(a), true) => format!("{a} (connected)"),
            (Some(a), false) => format!(
                "{a} (disconnected: {})",
                s.control.error.as_deref().unwrap_or("connecting")
            ),
        };
        println!("control:     {control}");
        print_parties(&s.parties);
    }
    Ok(())
}

async fn events(
    state_dir: &Path,
    follow: bool,
    types: Option<Vec<EventType>>,
    peer: Option<String>,
    json: bool,
) -> Result<()> {
    let socket = state_dir.join("rally.sock");
    let req = IpcRequest::Events {
        follow,
        types,
        peer,
    };
    let mut failure = None;
    ipc::call_stream(&socket, &req, |reply| match reply {
        Ok(IpcReply::Events { events, missed }) => {
            if missed > 0 {
                eprintln!("({missed} events missed: reading too slowly)");
            }
            for e in events {
                if json {
                    println!("{}", e.to_json_line());
                } else {
                    println!(
                        "{} {:<14} {:<12} {:<24} {}",
                        e.time,
                        e.kind.as_str(),
                        e.peer.as_deref().unwrap_or("-"),
                        e.path.as_deref().unwrap_or("-"),
                        e.message
                    );
                }
            }
            true
        }
        Ok(_) => true,
        Err(e) => {
            failure = Some(e);
            false
        }
    })
    .await?;
    if let Some(e) = failure {
        bail!(e);
    }
    Ok(())
}

async fn metrics(state_dir: &Path, json: bool) -> Result<()> {
    let peers = peers(state_dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
    } else {
        for p in &peers {
            println!(
                "{} ({}) {} via {}, {} failovers, {} relay switches, {} queued ({} dropped)",
                p.name,
                p.virtual_ip,
                p.state,
                p.path_label(),
                p.failovers,
                p.relay_switches,
                p.queued,
                p.queue_dropped
            );
            for m in &p.paths {
                println!(
                    "  {:<28} {:<8} {:>9} priority {}{}",
                    m.path.to_string(),
                    format!("{:?}", m.health).to_lowercase(),
                    m.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms")),
                    m.priority,
                    if m.is_primary { "  (primary)" } else { "" }
                );
            }
        }
        if let Ok(IpcReply::Discovery(d)) = call(state_dir, IpcRequest::Discovery).await {
            rally_agent::discovery::cli::print_counters(&d);
        }
    }
    Ok(())
}

/// `rally discovery [--json]`.
async fn discovery(state_dir: &Path, json: bool) -> Result<()> {
    let reply = call(state_dir, IpcRequest::Discovery).await?;
    let IpcReply::Discovery(d) = reply else {
        bail!(unexpected(&reply));
    };
    rally_agent::discovery::cli::print(&d, json)?;
    Ok(())
}

async fn set_primary(state_dir: &Path, peer: String, path: String) -> Result<()> {
    call(
        state_dir,
        IpcRequest::SetPrimary {
            peer: peer.clone(),
            path: path.clone(),
        },
    )
    .await?;
    println!("{peer}: primary path pinned to {path}");
    Ok(())
}

async fn netcheck(state_dir: &Path, json: bool) -> Result<()> {
    let reply = call(state_dir, IpcRequest::Netcheck).await?;
    let IpcReply::Netcheck(report) = reply else {
        bail!(unexpected(&reply));
    };
    let nat = &report.nat;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let behavior = |b| {
            serde_json::to_value(b)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        };
        println!(
            "UDP:             {}",
            if nat.udp { "yes" } else { "blocked" }
        );
        if let Some(t) = &report.control_transport {
            println!("control over:    {t}");
        }
        if let Some(t) = &report.relay_transport {
            println!("relays over:     {t} ({})", report.relay_paths.join(", "));
        }
        println!("mapping:         {}", behavior(nat.mapping));
        println!("filtering:       {}", behavior(nat.filtering));
        println!(
            "port preserving: {}",
            if nat.port_preserving { "yes" } else { "no" }
        );
        println!(
            "public endpoint: {}",
            nat.public_endpoint.map_or("-".into(), |e| e.to_string())
        );
        println!(
            "port mapping:    {}",
            rally_agent::portmap::describe(report.port_mapping.as_ref())
        );
        for r in &nat.relays {
            println!(
                "relay {:<10} {:<22} {}",
                r.name,
                r.addr,
                r.latency_ms
                    .map_or("no answer".into(), |l| format!("{l:.1} ms"))
            );
        }
    }
    Ok(())
}

async fn peers(state_dir: &Path) -> Result<Vec<PeerStatus>> {
    let reply = call(state_dir, IpcRequest::Peers).await?;
    let IpcReply::Peers { peers } = reply else {
        bail!(unexpected(&reply));
    };
    Ok(peers)
}

async fn ping(state_dir: &Path, query: &str, count: u32, interval: f64) -> Result<()> {
    let list = peers(state_dir).await?;
    let peer = resolve_peer(&list, query).map_err(|e| anyhow!(e))?.clone();
    let client = surge_ping::Client::new(&surge_ping::Config::default())
        .context("opening an ICMP socket (needs root or CAP_NET_RAW)")?;
    let mut pinger = client
        .pinger(
            IpAddr::V4(peer.virtual_ip),
            surge_ping::PingIdentifier(std::process::id() as u16),
        )
        .await;
    pinger.timeout(Duration::from_secs(1));
    let payload = [0u8; 56];
    let mut rtts = Vec::new();
    println!("PING {} ({})", peer.name, peer.virtual_ip);
    for seq in 0..count {
        if seq > 0 {
            tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        }
        match pinger
            .ping(surge_ping::PingSequence(seq as u16), &payload)
            .await
        {
            Ok((_, rtt)) => {
                let path = peers(state_dir)
                    .await
                    .ok()
                    .and_then(|ps| ps.into_iter().find(|p| p.peer_id == peer.peer_id))
                    .map(|p| describe_path(&p))
                    .unwrap_or_else(|| "unknown path".into());
                let ms = rtt.as_secs_f64() * 1000.0;
                println!(
                    "reply from {} ({}) via {path}: seq={seq} time={ms:.2} ms",
                    peer.name, peer.virtual_ip
                );
                rtts.push(ms);
            }
            Err(e) => println!(
                "no reply from {} ({}): seq={seq} {e}",
                peer.name, peer.virtual_ip
            ),
        }
    }
    let lost = count as usize - rtts.len();
    print!(
        "{count} sent, {} received, {:.0}% loss",
        rtts.len(),
        lost as f64 * 100.0 / count as f64
    );
    if rtts.is_empty() {
        println!();
        bail!("no reply from {} ({})", peer.name, peer.virtual_ip);
    }
    let min = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().cloned().fold(0.0, f64::max);
    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
    println!("; rtt min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms");
    Ok(())
}
