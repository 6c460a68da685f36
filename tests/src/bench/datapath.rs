//! Throughput (iperf3) and latency (ping) through every path of a [`Datapath`], runs
//! interleaved so that every subject sees the same noise.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::stats::{quantile, Figure};
use super::tools::{self, Tool};
use super::tunnels::{start_iperf_server, Datapath, Path, Subject, IPERF_PORT};
use super::Options;

/// The four TCP configurations: streams and direction.
pub const TCP_CASES: [(u32, bool); 4] = [(1, false), (1, true), (4, false), (4, true)];

fn tcp_metric(streams: u32, reverse: bool) -> String {
    let dir = if reverse { "b→a" } else { "a→b" };
    let s = if streams == 1 { "stream" } else { "streams" };
    format!("tcp {streams} {s} {dir}")
}

/// `iperf3 -c` from the path's client to its target (a one-off server on the path's server, so
/// that a stalled test cannot block the next); the receiver's rate in Mbit/s.
pub fn iperf(path: &Path, streams: u32, reverse: bool, secs: u64) -> Result<f64> {
    let server = start_iperf_server(&path.server)?;
    let r = iperf_client(path, streams, reverse, secs);
    if server.wait_timeout(Duration::from_secs(2))?.is_none() {
        server.terminate(Duration::from_secs(1))?;
    }
    r
}

fn iperf_client(path: &Path, streams: u32, reverse: bool, secs: u64) -> Result<f64> {
    let iperf = tools::path(Tool::Iperf3)?.to_string_lossy().into_owned();
    let target = path.target.to_string();
    let (t, p, port) = (
        secs.to_string(),
        streams.to_string(),
        IPERF_PORT.to_string(),
    );
    let mut args = vec![
        iperf.as_str(),
        "-c",
        target.as_str(),
        "-p",
        port.as_str(),
        "-t",
        t.as_str(),
        "-O",
        "1",
        "-P",
        p.as_str(),
        "--connect-timeout",
        "3000",
        "-J",
    ];
    if reverse {
        // Only a receiving client may have an idle timeout.
        args.extend(["-R", "--rcv-timeout", "5000"]);
    }
    let out = path
        .client
        .run_timeout(&args, Duration::from_secs(secs + 30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 printed no JSON: {}", text.trim()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e6)
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))
}

/// Round-trip times (ms) of `count` pings `interval` apart from the path's client to its target.
pub fn ping_rtts(path: &Path, count: u32, interval: &str) -> Result<Vec<f64>> {
    let target = path.target.to_string();
    let c = count.to_string();
    let out = path.client.run_timeout(
        &[
            "ping",
            "-n",
            "-c",
            c.as_str(),
            "-i",
            interval,
            "-W",
            "1",
            target.as_str(),
        ],
        Duration::from_secs(u64::from(count) / 10 + 30),
    )?;
    let rtts = parse_ping_times(&String::from_utf8_lossy(&out.stdout));
    if rtts.is_empty() {
        bail!(
            "no ping reply from {target} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(rtts)
}

/// Every `time=X ms` of ping's per-reply lines.
pub fn parse_ping_times(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Keeps going when one measurement fails: the run's value is NaN and the error is printed.
fn or_nan(what: &str, r: Result<f64>) -> f64 {
    match r {
        Ok(v) => v,
        Err(e) => {
            eprintln!("    {what}: FAILED: {e:#}");
            f64::NAN
        }
    }
}

/// The baselines every tunnel is compared with (the FIFO A/B only for Rally's direct path).
const BASES: [Subject; 3] = [Subject::Boringtun, Subject::WireguardGo, Subject::RallyFifo];

/// Samples per (metric, subject), in the order first seen.
#[derive(Default)]
struct Table {
    rows: Vec<(String, Subject, Vec<f64>)>,
}

impl Table {
    fn push(&mut self, metric: &str, s: Subject, v: f64) {
        match self.rows.iter_mut().find(|r| r.0 == metric && r.1 == s) {
            Some(r) => r.2.push(v),
            None => self.rows.push((metric.to_owned(), s, vec![v])),
        }
    }

    fn get(&self, metric: &str, s: Subject) -> Option<&[f64]> {
        self.rows
            .iter()
            .find(|r| r.0 == metric && r.1 == s)
            .map(|r| r.2.as_slice())
    }

    /// Figures with ratios: tunnels against raw veth and the two reference WireGuards.
    fn figures(&self, group: &str, unit: &str) -> Vec<Figure> {
        let mut out = Vec::new();
        for (metric, s, samples) in &self.rows {
            let mut f = Figure::new(group, metric, s.label(), unit, samples.clone());
            if s.is_tunnel() {
                for base in std::iter::once(Subject::Raw).chain(BASES) {
                    if base != *s && (base != Subject::RallyFifo || *s == Subject::Rally) {
                        if let Some(b) = self.get(metric, base) {
                            f.ratio_to(base.label(), b);
                        }
                    }
                }
            }
            out.push(f);
        }
        out
    }
}

/// TCP throughput, every case, every path, `opts.runs` interleaved runs.
pub fn throughput(dp: &Datapath, opts: &Options) -> Result<Vec<Figure>> {
    let mut table = Table::default();
    for run in 1..=opts.runs {
        for (streams, reverse) in TCP_CASES {
            let metric = tcp_metric(streams, reverse);
            for path in &dp.paths {
                let v = or_nan(
                    &format!("{metric} {}", path.subject.label()),
                    iperf(path, streams, reverse, opts.seconds),
                );
                println!(
                    "    run {run}/{}: {metric}, {}: {:.0} Mbit/s",
                    opts.runs,
                    path.subject.label(),
                    v
                );
                table.push(&metric, path.subject, v);
            }
        }
    }
    Ok(table.figures("throughput", "Mbit/s"))
}

/// The latency conditions: name, ping interval (s), and how many iperf3 streams load the path
/// meanwhile (0: idle). "idle" (10 ms apart) is the goal's figure. "idle, 2 ms apart" is the same
/// path with the CPUs given no time to fall deeply idle between pings: in a VM, waking a
/// vCPU that has idled for milliseconds costs tens of microseconds per wake-up, and a
/// tunnelled round trip wakes four threads; the difference between the two conditions is that
/// cost, and the 2 ms figure is closer to the tunnels' own work. Under load, a game-like UDP
/// stream ([`super::game`]) runs beside the pings, and the load's own throughput is recorded.
const LATENCY_CONDITIONS: [(&str, &str, u32); 4] = [
    ("idle", "0.01", 0),
    ("idle, 2 ms apart", "0.002", 0),
    ("under load", "0.01", 1),
    ("under 4-stream load", "0.01", 4),
];

/// Seconds of the game-like stream under load.
const GAME_SECS: u32 = 4;

/// What one latency measurement gave: ping RTTs, and under load the game stream's RTTs and
/// the load's throughput.
struct Sample {
    ping: Result<Vec<f64>>,
    game: Option<Result<Vec<f64>>>,
    load_mbps: Option<Result<f64>>,
}

/// Ping RTT p50/p99 for each of [`LATENCY_CONDITIONS`] through the same paths; under load also
/// the game-like stream's p50/p99 and the load's throughput; and the RTT each tunnel adds to
/// the raw path's (p50 and p99, per run).
pub fn latency(dp: &Datapath, opts: &Options) -> Result<Vec<Figure>> {
    const COUNT: u32 = 300;
    let mut table = Table::default();
    let mut loads = Table::default();
    for run in 1..=opts.runs {
        for (cond, interval, streams) in LATENCY_CONDITIONS {
            for path in &dp.paths {
                let sample = if streams > 0 {
                    under_load(path, streams, || {
                        std::thread::scope(|s| {
                            let game = s.spawn(|| super::game::game_rtts(path, GAME_SECS));
                            let ping = ping_rtts(path, COUNT, interval);
                            let game = game
                                .join()
                                .unwrap_or_else(|_| Err(anyhow!("game stream panicked")));
                            (ping, game)
                        })
                    })
                } else {
                    Sample {
                        ping: ping_rtts(path, COUNT, interval),
                        game: None,
                        load_mbps: None,
                    }
                };
                record(&mut table, &mut loads, (run, opts.runs), cond, path, sample);
            }
        }
    }
    let mut figures = table.figures("latency", "ms");
    figures.extend(added_figures(dp, &table));
    figures.extend(loads.figures("latency", "Mbit/s"));
    Ok(figures)
}

/// Puts one sample's quantiles (and throughput) in the table, printing them.
fn record(
    table: &mut Table,
    loads: &mut Table,
    (run, runs): (usize, usize),
    cond: &str,
    path: &Path,
    sample: Sample,
) {
    let label = path.subject.label();
    let quantiles = |what: &str, r: Result<Vec<f64>>| match r {
        Ok(r) => (
            quantile(&r, 0.5).unwrap_or(f64::NAN),
            quantile(&r, 0.99).unwrap_or(f64::NAN),
        ),
        Err(e) => {
            eprintln!("    {what} {label} {cond}: FAILED: {e:#}");
            (f64::NAN, f64::NAN)
        }
    };
    let (p50, p99) = quantiles("ping", sample.ping);
    println!("    run {run}/{runs}: rtt {cond}, {label}: p50 {p50:.3} ms, p99 {p99:.3} ms");
    table.push(&format!("rtt p50 {cond}"), path.subject, p50);
    table.push(&format!("rtt p99 {cond}"), path.subject, p99);
    if let Some(game) = sample.game {
        let (p50, p99) = quantiles("game stream", game);
        println!(
            "    run {run}/{runs}: game 60/s {cond}, {label}: p50 {p50:.3} ms, p99 {p99:.3} ms"
        );
        table.push(&format!("game rtt p50 {cond}"), path.subject, p50);
        table.push(&format!("game rtt p99 {cond}"), path.subject, p99);
    }
    if let Some(mbps) = sample.load_mbps {
        let v = or_nan(&format!("load {label} {cond}"), mbps);
        println!("    run {run}/{runs}: load throughput {cond}, {label}: {v:.0} Mbit/s");
        loads.push(&format!("load throughput {cond}"), path.subject, v);
    }
}

/// Added RTT: tunnel minus raw path of the same run (p50 and p99 of pings, p99 of the game
/// stream), compared across tunnels.
fn added_figures(dp: &Datapath, table: &Table) -> Vec<Figure> {
    let mut added = Table::default();
    for (cond, _, streams) in LATENCY_CONDITIONS {
        let mut metrics = vec![format!("rtt p50 {cond}"), format!("rtt p99 {cond}")];
        if streams > 0 {
            metrics.push(format!("game rtt p99 {cond}"));
        }
        for metric in metrics {
            let Some(raw) = table.get(&metric, Subject::Raw) else {
                continue;
            };
            for path in dp.paths.iter().filter(|p| p.subject.is_tunnel()) {
                if let Some(t) = table.get(&metric, path.subject) {
                    for (x, r) in t.iter().zip(raw) {
                        added.push(&format!("added {metric}"), path.subject, x - r);
                    }
                }
            }
        }
    }
    let mut figures = Vec::new();
    for (metric, s, samples) in &added.rows {
        let mut f = Figure::new("latency", metric, s.label(), "ms", samples.clone());
        for base in BASES {
            if base != *s && (base != Subject::RallyFifo || *s == Subject::Rally) {
                if let Some(b) = added.get(metric, base) {
                    f.ratio_to(base.label(), b);
                }
            }
        }
        figures.push(f);
    }
    figures
}

/// Runs `f` while `streams` iperf3 streams a→b saturate `path`; also returns the load's
/// throughput (the receiver's, Mbit/s).
fn under_load(
    path: &Path,
    streams: u32,
    f: impl FnOnce() -> (Result<Vec<f64>>, Result<Vec<f64>>),
) -> Sample {
    let failed = |e: anyhow::Error| Sample {
        ping: Err(anyhow!("{e:#}")),
        game: Some(Err(anyhow!("{e:#}"))),
        load_mbps: Some(Err(e)),
    };
    let iperf = match tools::path(Tool::Iperf3) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => return failed(e),
    };
    let target = path.target.to_string();
    let (port, p) = (IPERF_PORT.to_string(), streams.to_string());
    let server = match start_iperf_server(&path.server) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let args = [
        iperf.as_str(),
        "-c",
        target.as_str(),
        "-p",
        port.as_str(),
        "-t",
        "7",
        "-P",
        p.as_str(),
        "-J",
    ];
    // A log of its own: iperf3's JSON is read back from it.
    static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let load = match path
        .client
        .spawn(&args, path.client.log_path(&format!("iperf3-load-{n}")))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = server.terminate(Duration::from_secs(1));
            return failed(e);
        }
    };
    std::thread::sleep(Duration::from_millis(1500));
    let (ping, game) = f();
    let finished = load.wait_timeout(Duration::from_secs(10));
    if !matches!(finished, Ok(Some(_))) {
        let _ = load.terminate(Duration::from_secs(2));
    }
    if !matches!(server.wait_timeout(Duration::from_secs(2)), Ok(Some(_))) {
        let _ = server.terminate(Duration::from_secs(1));
    }
    Sample {
        ping,
        game: Some(game),
        load_mbps: Some(load_throughput(load.log_path())),
    }
}

/// The receiver's rate (Mbit/s) in the JSON iperf3 wrote to `log`.
fn load_throughput(log: &std::path::Path) -> Result<f64> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let json = text
        .find('{')
        .map(|i| &text[i..])
        .ok_or_else(|| anyhow!("iperf3 printed no JSON"))?;
    // The log may hold earlier runs' documents too: the last one is this run's.
    let v = serde_json::Deserializer::from_str(json)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .last()
        .ok_or_else(|| anyhow!("iperf3's JSON does not parse"))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e6)
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_times_are_read_per_reply() {
        let text = "PING 10.66.0.2 (10.66.0.2) 56(84) bytes of data.\n\
                    64 bytes from 10.66.0.2: icmp_seq=1 ttl=64 time=0.123 ms\n\
                    64 bytes from 10.66.0.2: icmp_seq=2 ttl=64 time=1.5 ms\n\
                    rtt min/avg/max/mdev = 0.123/0.8/1.5/0.6 ms\n";
        assert_eq!(parse_ping_times(text), vec![0.123, 1.5]);
    }

    #[test]
    fn tcp_metrics_name_streams_and_direction() {
        assert_eq!(tcp_metric(1, false), "tcp 1 stream a→b");
        assert_eq!(tcp_metric(4, true), "tcp 4 streams b→a");
    }
}
