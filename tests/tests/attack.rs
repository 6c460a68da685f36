//! Attacks on a live party, by attack clients that speak the real protocols (`rally-lab attack`):
//! floods at an agent's port, a member's modified WireGuard client, forged relay errors, and a
//! crashed agent coming back.

use anyhow::{ensure, Result};
use rally_lab::bench::flood::{handshake_drops, Flood, FloodLab};
use rally_lab::with_lab;

/// A 2 s flood at 100,000 datagrams/s.
const FLOOD_SECONDS: f64 = 2.0;
const FLOOD_RATE: u64 = 100_000;
/// A generous bound for CI machines (the benchmark's goal is 100 ms).
const MAX_GAP_MS: f64 = 1000.0;

#[test]
fn handshake_floods_do_not_stall_the_tunnel() -> Result<()> {
    with_lab(|lab| {
        let f = FloodLab::build(lab)?;
        let base = f.measure(Flood::None, FLOOD_SECONDS, FLOOD_RATE)?;
        println!("no flood: longest ping gap {:.1} ms", base.longest_gap_ms);
        for flood in [Flood::HandshakeRandom, Flood::HandshakeMac1] {
            let o = f.measure(flood, FLOOD_SECONDS, FLOOD_RATE)?;
            let attack = o.attack.clone().unwrap_or_else(|| unreachable!());
            println!(
                "{}: longest ping gap {:.1} ms ({}/{} replies), {} datagrams sent in {:.2} s, \
                 handshake drops {:.0}",
                flood.label(),
                o.longest_gap_ms,
                o.replies,
                o.pings_sent,
                attack.sent,
                attack.seconds,
                o.handshake_drops
            );
            ensure!(
                o.longest_gap_ms < MAX_GAP_MS,
                "{}: the ping stream stopped for {:.0} ms",
                flood.label(),
                o.longest_gap_ms
            );
            ensure!(
                o.handshake_drops > 0.0,
                "{}: the handshake guard dropped nothing",
                flood.label()
            );
            ensure!(
                o.replies * 10 >= o.pings_sent * 9,
                "{}: only {} of {} pings answered",
                flood.label(),
                o.replies,
                o.pings_sent
            );
        }
        Ok(())
    })
}

/// The security counters are current when read, with no timer between: once a ping sent after
/// the datagrams has been answered (alice's socket hands datagrams over in order, so all of
/// them were handled), one scrape of alice's metrics counts every one of them.
#[test]
fn security_counters_are_current_when_read() -> Result<()> {
    with_lab(|lab| {
        let f = FloodLab::build(lab)?;
        let vip = f.alice.virtual_ip()?.to_string();
        let before = handshake_drops(&f.alice)?;
        let sent = f.send(Flood::HandshakeRandom, 500)?.sent;
        ensure!(sent == 500, "the attack client sent {sent} datagrams");
        ensure!(
            f.bob.kernel_ping(&vip, 1)?.status.success(),
            "bob's ping to alice after the datagrams was not answered"
        );
        let counted = handshake_drops(&f.alice)? - before;
        ensure!(
            counted == 500.0,
            "the first scrape after the datagrams counts {counted} of 500 handshake drops"
        );
        Ok(())
    })
}

#[test]
fn forged_probes_reflect_no_more_bytes_than_they_carry() -> Result<()> {
    with_lab(|lab| {
        let f = FloodLab::build(lab)?;
        // 2,000 forged probes (authenticated with mallory's key) from the observer's address.
        let o = f.measure(Flood::Probe, 1.0, 2000)?;
        let reflection = o.reflection().unwrap_or(f64::NAN);
        println!(
            "forged probes: {} bytes sent, {} reached the observer ({reflection:.2}×); \
             longest ping gap {:.1} ms",
            o.attack.as_ref().map_or(0, |a| a.bytes),
            o.reflected_bytes.unwrap_or(0),
            o.longest_gap_ms
        );
        ensure!(
            o.reflected_bytes.unwrap_or(0) > 0,
            "nothing reached the observer: the probes were not taken for mallory's"
        );
        ensure!(
            reflection <= 1.05,
            "the victim sent {reflection:.2}× the forged bytes to the spoofed address"
        );
        Ok(())
    })
}
