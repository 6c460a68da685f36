//! How the client commands print what the daemon answered.

use std::net::SocketAddr;

use rally_agent::api::PeerStatus;
use rally_proto::control::PartyInfo;

pub(super) fn print_parties(parties: &[PartyInfo]) {
    if parties.is_empty() {
        println!("parties:     none");
        return;
    }
    println!("parties:");
    for p in parties {
        println!("  {:<20} {:>3} members  id {}", p.name, p.members, p.id);
    }
}

pub(super) fn print_peers(peers: &[PeerStatus]) {
    if peers.is_empty() {
        println!("no peers yet: create a party (`rally party create NAME`) or join one");
        return;
    }
    println!(
        "{:<16} {:<15} {:<12} {:<8} {:<22} {:>9} {:>10} {:>10}",
        "NAME", "VIRTUAL IP", "STATE", "PATH", "ENDPOINT", "LATENCY", "SENT", "RECEIVED"
    );
    for p in peers {
        println!(
            "{:<16} {:<15} {:<12} {:<8} {:<22} {:>9} {:>10} {:>10}",
            p.name,
            p.virtual_ip,
            p.state,
            p.path_label(),
            p.endpoint.map_or("-".into(), |e| e.to_string()),
            p.latency_ms.map_or("-".into(), |l| format!("{l:.0} ms")),
            bytes(p.bytes_sent),
            bytes(p.bytes_received),
        );
    }
}

pub(super) fn describe_path(p: &PeerStatus) -> String {
    let label = p.path_label();
    match p.endpoint {
        Some(SocketAddr::V4(e)) => format!("{label} {e}"),
        Some(e) => format!("{label} {e}"),
        None => label,
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
