//! `rally up --discovery …` flags and `rally discovery [--json]`.

use std::collections::BTreeSet;

use clap::Args;

use super::{parse_ports, DiscoveryConfig, DiscoveryStatus, DEFAULT_RATE};

/// LAN game discovery settings of `rally up`.
#[derive(Args, Debug, Clone)]
pub struct DiscoveryArgs {
    /// LAN game discovery: forward broadcasts and multicasts to the party (`on` or `off`).
    #[arg(long = "discovery", value_name = "on|off", default_value = "on",
          action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub enabled: bool,
    /// Ports never forwarded, comma-separated (e.g. 1900,5353).
    #[arg(long = "discovery-ports-off", value_name = "PORTS", value_parser = parse_ports)]
    pub ports_off: Option<BTreeSet<u16>>,
    /// A party whose members get no discovery traffic from us and none to us (repeatable).
    #[arg(long = "discovery-party-off", value_name = "PARTY")]
    pub parties_off: Vec<String>,
    /// Per-sender cap in packets per second, both ways.
    #[arg(long = "discovery-rate", default_value_t = DEFAULT_RATE,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

impl DiscoveryArgs {
    pub fn config(&self) -> DiscoveryConfig {
        DiscoveryConfig {
            enabled: self.enabled,
            rate: self.rate,
            blocked_ports: self.ports_off.clone().unwrap_or_default(),
            blocked_parties: self.parties_off.iter().cloned().collect(),
        }
    }
}

/// Prints `rally discovery`.
pub fn print(s: &DiscoveryStatus, json: bool) -> Result<(), serde_json::Error> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "discovery: {}, cap {} packets/s per sender, ports off: {}, parties off: {}",
        if s.enabled { "on" } else { "off" },
        s.rate_limit,
        list(s.blocked_ports.iter().map(u16::to_string).collect()),
        list(s.blocked_parties.clone()),
    );
    println!(
        "groups listened to here: {}",
        list(s.local_groups.iter().map(|g| g.to_string()).collect())
    );
    for p in &s.peer_groups {
        println!(
            "  {} listens to {}",
            p.peer,
            list(p.groups.iter().map(|g| g.to_string()).collect())
        );
    }
    for f in &s.flows {
        println!(
            "{:<9} {}:{:<5} sent {:>6} received {:>6} dropped {:>6} {:>4}/s last {} ({} ms ago)",
            f.kind,
            f.address,
            f.port,
            f.sent,
            f.received,
            f.dropped,
            f.rate_pps,
            f.last_sender.map_or("-".into(), |a| a.to_string()),
            f.last_seen_ms_ago
        );
    }
    print_counters(s);
    Ok(())
}

/// The counters line (`rally discovery`, `rally metrics`).
pub fn print_counters(s: &DiscoveryStatus) {
    let c = &s.counters;
    println!(
        "discovery: {} forwarded ({} copies), {} delivered, dropped: {} capped, {} duplicate, {} off, {} unsubscribed, {} malformed, {} looped",
        c.forwarded,
        c.copies_sent,
        c.delivered,
        c.dropped_capped,
        c.dropped_duplicate,
        c.dropped_disabled,
        c.dropped_unsubscribed,
        c.dropped_malformed,
        c.dropped_foreign
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Up {
        #[command(flatten)]
        d: DiscoveryArgs,
    }

    fn parse(args: &[&str]) -> Result<DiscoveryConfig, clap::Error> {
        Up::try_parse_from(std::iter::once("up").chain(args.iter().copied())).map(|u| u.d.config())
    }

    #[test]
    fn flags_and_defaults() {
        assert_eq!(parse(&[]).ok(), Some(DiscoveryConfig::default()));
        let c = parse(&[
            "--discovery",
            "off",
            "--discovery-ports-off",
            "1900,5353",
            "--discovery-party-off",
            "work",
            "--discovery-rate",
            "50",
        ])
        .expect("valid flags");
        assert!(!c.enabled);
        assert_eq!(c.blocked_ports, BTreeSet::from([1900, 5353]));
        assert!(c.blocked_parties.contains("work"));
        assert_eq!(c.rate, 50);
        for bad in [
            &["--discovery", "maybe"][..],
            &["--discovery-ports-off", "0"],
            &["--discovery-rate", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
