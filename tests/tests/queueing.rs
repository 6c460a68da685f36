//! The data plane's queues (issue 18) carry real traffic: a bulk TCP transfer and pings share
//! a direct tunnel, and both get through; with the queues (default) and without them
//! (`RALLY_DATAPLANE_FIFO=1`, the A/B baseline). Latency figures are `rally-lab bench
//! latency`'s; nothing here is timed.
//! Run with `cargo nextest run -p rally-lab --test queueing` after `cargo build --workspace
//! --bins` (needs iperf3).

use std::time::Duration;

use anyhow::{ensure, Result};
use rally_lab::bench::datapath::{iperf, parse_ping_times};
use rally_lab::bench::tools::{self, Tool};
use rally_lab::bench::tunnels::{control_init, rally_pair, serve_control, Path, Subject};
use rally_lab::with_lab;

#[test]
fn bulk_transfer_and_pings_share_the_tunnel() -> Result<()> {
    shared_tunnel_carries_both(false)
}

#[test]
fn bulk_transfer_and_pings_share_the_tunnel_without_queues() -> Result<()> {
    shared_tunnel_carries_both(true)
}

fn shared_tunnel_carries_both(fifo: bool) -> Result<()> {
    tools::ensure(&[Tool::Iperf3, Tool::Ping])?;
    with_lab(|lab| {
        let a = lab.add_host("a")?;
        let b = lab.add_host("b")?;
        let c = lab.add_host("control")?;
        let key = control_init(lab, &c, "q")?;
        let control = serve_control(lab, &c, "q", key, &[], &[])?;
        if fifo {
            // The agents inherit the test's environment; the pair starts before anything else.
            std::env::set_var("RALLY_DATAPLANE_FIFO", "1");
        }
        let pair = rally_pair(&control, &a, &b, "q", "direct");
        std::env::remove_var("RALLY_DATAPLANE_FIFO");
        let (aa, ab) = pair?;
        let target = ab.virtual_ip()?;
        let path = Path {
            subject: Subject::Rally,
            client: a.clone(),
            server: b.clone(),
            target,
            pids: Vec::new(),
        };
        let t = target.to_string();
        let pings = a.spawn(
            &[
                "ping",
                "-n",
                "-c",
                "300",
                "-i",
                "0.01",
                "-W",
                "1",
                t.as_str(),
            ],
            a.log_path("ping-under-load"),
        )?;
        let (mbps, recv_q) = std::thread::scope(|s| {
            let watch = s.spawn(|| max_udp_recv_queue(&b, Duration::from_secs(3)));
            let mbps = iperf(&path, 2, false, 3);
            (mbps, watch.join())
        });
        let mbps = mbps?;
        if let Ok(Ok(q)) = recv_q {
            // Where the time goes below the agent: what waited in its socket's receive queue.
            println!("fifo={fifo}: largest UDP receive queue on b under load: {q} bytes");
        }
        let status = pings.wait_timeout(Duration::from_secs(30))?;
        ensure!(status.is_some(), "ping did not finish");
        let text = std::fs::read_to_string(pings.log_path())?;
        let replies = parse_ping_times(&text).len();
        println!("fifo={fifo}: {mbps:.0} Mbit/s, {replies}/300 ping replies under load");
        // The receiving agent's own view (logged every 2 s under load with the queues on):
        // drops, sojourns, and how long its socket waited between two reads.
        for (side, agent) in [("sending", &aa), ("receiving", &ab)] {
            let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
            if let Some(line) = log.lines().rev().find(|l| l.contains("data-plane queues")) {
                println!("fifo={fifo}: {side} agent: {line}");
            }
        }
        ensure!(mbps > 1.0, "the bulk transfer moved {mbps} Mbit/s");
        ensure!(
            replies >= 270,
            "only {replies} of 300 pings answered beside the transfer"
        );
        Ok(())
    })
}

/// The largest receive queue (bytes) of any UDP socket on `host`, sampled for `window`.
fn max_udp_recv_queue(host: &rally_lab::Host, window: Duration) -> Result<u64> {
    let end = std::time::Instant::now() + window;
    let mut max = 0;
    while std::time::Instant::now() < end {
        let out = host.run_ok(&["ss", "-H", "-u", "-a", "-n"])?;
        for line in out.lines() {
            let q = line.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            max = max.max(q.unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(max)
}
