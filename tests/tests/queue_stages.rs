//! Where a ping's round trip goes under load (issue 18): both agents run with
//! `RALLY_DATAPLANE_TRACE=1` and a metrics endpoint; pings cross a direct tunnel idle, then
//! beside a one-stream iperf3, and the test prints, from the agents' histograms, the age of
//! the echoes at each of the four points of a round trip (request read from the TUN device on
//! the pinging side `a`, decrypted on `b`; reply read from `b`'s TUN device, decrypted on `a`),
//! the bulk sojourns, `b`'s UDP receive queue at its reads, and how long each data-plane thread
//! waited for a CPU. With the queues (default) and without (`RALLY_DATAPLANE_FIFO=1`).
//! Run with `cargo nextest run -p rally-lab --test queue_stages --no-capture` after `cargo build
//! --workspace --bins` (needs iperf3; `RALLY_BIN_DIR=target/release` for release agents).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use rally_lab::bench::datapath::{iperf, parse_ping_times};
use rally_lab::bench::tools::{self, Tool};
use rally_lab::bench::tunnels::{
    control_init, rally_pair_with, serve_control, with_agent_env, Path, Subject,
};
use rally_lab::{with_lab, Host};

const METRICS_PORT: u16 = 9100;
const ECHO: &str = "rally_dataplane_echo_age_seconds";
const POINTS: [(&str, &str, &str); 4] = [
    (
        "a",
        "echo=\"request\",point=\"tun_read\"",
        "request read from a's TUN",
    ),
    (
        "b",
        "echo=\"request\",point=\"decrypted\"",
        "request decrypted on b",
    ),
    (
        "b",
        "echo=\"reply\",point=\"tun_read\"",
        "reply read from b's TUN",
    ),
    (
        "a",
        "echo=\"reply\",point=\"decrypted\"",
        "reply decrypted on a",
    ),
];

#[test]
fn stages_of_a_round_trip_with_queues() -> Result<()> {
    stages(false)
}

#[test]
fn stages_of_a_round_trip_without_queues() -> Result<()> {
    stages(true)
}

fn stages(fifo: bool) -> Result<()> {
    tools::ensure(&[Tool::Iperf3, Tool::Ping])?;
    with_lab(|lab| {
        let a = lab.add_host("a")?;
        let b = lab.add_host("b")?;
        let c = lab.add_host("control")?;
        let key = control_init(lab, &c, "st")?;
        let control = serve_control(lab, &c, "st", key, &[], &[])?;
        let metrics = |h: &Host| vec!["--metrics".into(), format!("{}:{METRICS_PORT}", h.ip())];
        let env: &[(&str, &str)] = if fifo {
            &[
                ("RALLY_DATAPLANE_TRACE", "1"),
                ("RALLY_DATAPLANE_FIFO", "1"),
            ]
        } else {
            &[("RALLY_DATAPLANE_TRACE", "1")]
        };
        let (_aa, ab) = with_agent_env(env, || {
            rally_pair_with(&control, [&a, &b], "st", "direct", metrics)
        })?;
        let target = ab.virtual_ip()?;
        let path = Path {
            subject: Subject::Rally,
            client: a.clone(),
            server: b.clone(),
            target,
            pids: Vec::new(),
        };
        let hosts = [("a", &a), ("b", &b)];
        println!("fifo={fifo} before: a's TUN device:\n{}", tun_device(&a)?);
        let before = scrape_all(&hosts)?;
        let idle = pings(&a, &target.to_string(), 100)?;
        let mid = scrape_all(&hosts)?;
        let t = target.to_string();
        let (mbps, loaded) = std::thread::scope(|s| {
            let p = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                pings(&a, &t, 300)
            });
            (iperf(&path, 1, false, 6), p.join())
        });
        let after = scrape_all(&hosts)?;
        // The kernel's queue in front of the sending agent: drops and backlog of the TUN
        // device's ring and qdisc.
        println!("fifo={fifo} after: a's TUN device:\n{}", tun_device(&a)?);
        let mbps = mbps?;
        let loaded = loaded.map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
        println!("fifo={fifo}: {mbps:.0} Mbit/s; ping p50 idle {:.3} ms, under load {:.3} ms (p99 {:.3})",
            q(&idle, 0.5), q(&loaded, 0.5), q(&loaded, 0.99));
        for (phase, from, to) in [("idle", &before, &mid), ("load", &mid, &after)] {
            for (host, labels, what) in POINTS {
                let h = delta(&to[host], &from[host], ECHO, labels);
                println!("fifo={fifo} {phase}: {what:28} {}", describe(&h, 1e3, "ms"));
            }
        }
        for (host, _) in hosts {
            let (m0, m1) = (&mid[host], &after[host]);
            for dir in ["tx", "rx"] {
                let l = format!("direction=\"{dir}\"");
                let h = delta(m1, m0, "rally_dataplane_sojourn_seconds", &l);
                println!(
                    "fifo={fifo} load: {host} bulk sojourn {dir}: {}",
                    describe(&h, 1e3, "ms")
                );
            }
            let h = delta(m1, m0, "rally_dataplane_udp_receive_queue_bytes", "");
            println!(
                "fifo={fifo} load: {host} UDP receive queue at reads: {}",
                describe(&h, 1e-3, "kB")
            );
            let v = |m: &str, name: &str| scalar(m, name).unwrap_or(f64::NAN);
            let cpu = v(m1, "rally_dataplane_thread_cpu_seconds_total")
                - v(m0, "rally_dataplane_thread_cpu_seconds_total");
            let wait = v(m1, "rally_dataplane_thread_run_delay_seconds_total")
                - v(m0, "rally_dataplane_thread_run_delay_seconds_total");
            let slices = v(m1, "rally_dataplane_thread_timeslices_total")
                - v(m0, "rally_dataplane_thread_timeslices_total");
            println!("fifo={fifo} load: {host} data-plane thread: {cpu:.2} s on a CPU, {wait:.3} s waiting for one, {slices:.0} slices ({:.1} µs waited per slice)",
                wait / slices.max(1.0) * 1e6);
        }
        ensure!(mbps > 1.0, "the bulk transfer moved {mbps} Mbit/s");
        ensure!(
            loaded.len() >= 250,
            "only {} of 300 pings answered under load",
            loaded.len()
        );
        for (host, labels, what) in POINTS {
            let n: u64 = delta(&after[host], &mid[host], ECHO, labels)
                .iter()
                .map(|b| b.1)
                .sum();
            ensure!(
                n as usize >= loaded.len(),
                "{what}: {n} echoes traced for {} replies",
                loaded.len()
            );
        }
        Ok(())
    })
}

/// `ip -s link` and `tc -s qdisc` of the host's point-to-point (TUN) devices.
fn tun_device(host: &Host) -> Result<String> {
    let script = "for d in $(ip -o link | awk -F': ' '/POINTOPOINT/ {print $2}'); do \
        ip -s link show dev $d; tc -s qdisc show dev $d; done";
    host.run_ok(&["bash", "-c", script])
}

fn pings(host: &Host, target: &str, count: u32) -> Result<Vec<f64>> {
    let c = count.to_string();
    let out = host.run(&[
        "ping",
        "-n",
        "-c",
        c.as_str(),
        "-i",
        "0.01",
        "-W",
        "1",
        target,
    ])?;
    Ok(parse_ping_times(&String::from_utf8_lossy(&out.stdout)))
}

fn q(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn scrape_all(hosts: &[(&'static str, &Host)]) -> Result<BTreeMap<&'static str, String>> {
    hosts.iter().map(|(n, h)| Ok((*n, scrape(h)?))).collect()
}

fn scrape(host: &Host) -> Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{METRICS_PORT}; printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3",
        host.ip()
    );
    let out = host.run_ok(&["bash", "-c", &script])?;
    ensure!(out.starts_with("HTTP/1.1 200"), "bad metrics answer: {out}");
    Ok(out)
}

/// A histogram's buckets (upper bound, count in that bucket: not cumulative) from `later`
/// minus `earlier`.
fn delta(later: &str, earlier: &str, name: &str, labels: &str) -> Vec<(f64, u64)> {
    let (l, e) = (buckets(later, name, labels), buckets(earlier, name, labels));
    let mut prev = 0;
    l.iter()
        .map(|&(le, c)| {
            let c0 = e.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            let cum = c.saturating_sub(c0);
            let d = cum.saturating_sub(prev);
            prev = cum;
            (le, d)
        })
        .collect()
}

/// Cumulative buckets of one histogram series.
fn buckets(text: &str, name: &str, labels: &str) -> Vec<(f64, u64)> {
    let prefix = format!(
        "{name}_bucket{{{labels}{}le=\"",
        if labels.is_empty() { "" } else { "," }
    );
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect()
}

fn scalar(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// "n, p50 ≤ x, p90 ≤ y, p99 ≤ z" in `unit` (values × `scale`).
fn describe(h: &[(f64, u64)], scale: f64, unit: &str) -> String {
    let n: u64 = h.iter().map(|b| b.1).sum();
    if n == 0 {
        return "none".into();
    }
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        h.iter()
            .find(|b| {
                seen += b.1;
                seen >= rank
            })
            .map_or(f64::NAN, |b| b.0 * scale)
    };
    format!(
        "n={n} p50≤{:.3} p90≤{:.3} p99≤{:.3} {unit}",
        at(0.5),
        at(0.9),
        at(0.99)
    )
}

#[test]
fn reads_histogram_deltas() -> Result<()> {
    let a = "x_bucket{le=\"1\"} 2\nx_bucket{le=\"2\"} 3\nx_bucket{le=\"+Inf\"} 3\n";
    let b = "x_bucket{le=\"1\"} 2\nx_bucket{le=\"2\"} 7\nx_bucket{le=\"+Inf\"} 8\n";
    let d = delta(b, a, "x", "");
    ensure!(d == vec![(1.0, 0), (2.0, 4), (f64::INFINITY, 1)], "{d:?}");
    ensure!(
        describe(&d, 1.0, "s").contains("p50≤2.000"),
        "{}",
        describe(&d, 1.0, "s")
    );
    ensure!(scalar("y_total 4.5\n", "y_total") == Some(4.5), "scalar");
    ensure!(
        scalar("y 1\n", "y_total").is_none(),
        "another metric's value"
    );
    Ok(())
}
