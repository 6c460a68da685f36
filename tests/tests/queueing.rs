//! The data plane's queues (issue 18) carry real traffic: a bulk TCP transfer and pings share
//! a direct tunnel, and both get through; with the queues (default) and without them
//! (`RALLY_DATAPLANE_FIFO=1`, the A/B baseline). With the queues, each agent's data-plane
//! thread holds the real-time class while the transfer flows and gives it back once idle
//! (read from `/proc`); the FIFO engine never takes it. Latency figures are `rally-lab bench
//! latency`'s; nothing here is timed.
//! Run with `cargo nextest run -p rally-lab --test queueing` after `cargo build --workspace
//! --bins` (needs iperf3).

use std::time::Duration;

use anyhow::{ensure, Result};
use rally_lab::bench::datapath::{iperf, parse_ping_times};
use rally_lab::bench::tools::{self, Tool};
use rally_lab::bench::tunnels::{
    agent_pid, control_init, rally_pair, serve_control, start_relay, with_agent_env, Path, Subject,
};
use rally_lab::{wait_until, with_lab};

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
        let env: &[(&str, &str)] = if fifo {
            &[("RALLY_DATAPLANE_FIFO", "1")]
        } else {
            &[]
        };
        let (aa, ab) = with_agent_env(env, || rally_pair(&control, &a, &b, "q", "direct"))?;
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
        let pids = [agent_pid(&aa)?, agent_pid(&ab)?];
        let (mbps, recv_q, realtime) = std::thread::scope(|s| {
            let watch = s.spawn(|| max_udp_recv_queue(&b, Duration::from_secs(3)));
            let classes = s.spawn(|| max_realtime_threads(&pids, Duration::from_secs(3)));
            let mbps = iperf(&path, 2, false, 3);
            (mbps, watch.join(), classes.join())
        });
        let mbps = mbps?;
        let realtime = realtime.map_err(|_| anyhow::anyhow!("class watcher panicked"))??;
        println!("fifo={fifo}: real-time threads seen under load (sender, receiver): {realtime:?}");
        let want = if fifo { [0, 0] } else { [1, 1] };
        ensure!(
            realtime == want,
            "real-time data-plane threads under load: {realtime:?}, not {want:?}"
        );
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
        back_in_the_fair_class(&a, &t, &pids)
    })
}

/// Two members cut from each other: a transfer between them goes through the relay, whose
/// forwarding thread holds the real-time class while it flows and gives it back once idle.
#[test]
fn relayed_bulk_raises_the_relays_forwarding_thread() -> Result<()> {
    tools::ensure(&[Tool::Iperf3, Tool::Ping])?;
    with_lab(|lab| {
        let ra = lab.add_host("ra")?;
        let rb = lab.add_host("rb")?;
        let c = lab.add_host("control")?;
        let r = lab.add_host("relay")?;
        let key = control_init(lab, &c, "qr")?;
        let (relay, spec) = start_relay(&r, "r1", &key, true)?;
        let control = serve_control(lab, &c, "qr", key, &[spec], &[])?;
        lab.cut(&ra, &rb)?;
        let (_xa, xb) = rally_pair(&control, &ra, &rb, "qr", "relay")?;
        let target = xb.virtual_ip()?;
        let path = Path {
            subject: Subject::RallyRelay,
            client: ra.clone(),
            server: rb.clone(),
            target,
            pids: Vec::new(),
        };
        let pid = relay.pid();
        ensure!(
            realtime_threads(pid)? == 0,
            "an idle relay holds a real-time class"
        );
        let (mbps, seen) = std::thread::scope(|s| {
            let classes = s.spawn(|| max_realtime_threads(&[pid], Duration::from_secs(3)));
            (iperf(&path, 1, false, 3), classes.join())
        });
        let mbps = mbps?;
        let seen = seen.map_err(|_| anyhow::anyhow!("class watcher panicked"))??;
        println!("relayed: {mbps:.0} Mbit/s; relay threads seen in the real-time class: {seen:?}");
        ensure!(mbps > 1.0, "the relayed transfer moved {mbps} Mbit/s");
        ensure!(
            seen == [1],
            "the relay's forwarding thread should take the real-time class under load"
        );
        back_in_the_fair_class(&ra, &target.to_string(), &[pid])
    })
}

/// Waits until no thread of `pids` is in the real-time class: each gives it back on its first
/// turn 2 s after the last bulk work, and a ping from `from` to `target` gives them a turn.
fn back_in_the_fair_class(from: &rally_lab::Host, target: &str, pids: &[u32]) -> Result<()> {
    wait_until(
        "the data path's threads back in the fair class",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            from.run(&["ping", "-n", "-c", "1", "-W", "1", target])?;
            let held: usize = pids
                .iter()
                .map(|&p| realtime_threads(p))
                .sum::<Result<_>>()?;
            Ok(held == 0)
        },
    )
}

/// The most threads of each process seen in the real-time class (`SCHED_RR`) over `window`.
fn max_realtime_threads(pids: &[u32], window: Duration) -> Result<Vec<usize>> {
    let end = std::time::Instant::now() + window;
    let mut max = vec![0; pids.len()];
    while std::time::Instant::now() < end {
        for (m, &pid) in max.iter_mut().zip(pids) {
            *m = (*m).max(realtime_threads(pid)?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(max)
}

/// Threads of `pid` whose scheduling policy (field 41 of `/proc/PID/task/TID/stat`) is
/// `SCHED_RR`.
fn realtime_threads(pid: u32) -> Result<usize> {
    const SCHED_RR: &str = "2";
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at field 3.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if rest.split_whitespace().nth(41 - 3) == Some(SCHED_RR) {
            n += 1;
        }
    }
    Ok(n)
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
