//! A kernel `ping -D` stream in a host's namespace and the analysis of its log: replies, the
//! worst outage in a window, settling time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::procs::Proc;
use crate::Host;

/// One echo reply of `ping -D`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reply {
    pub seq: u32,
    /// When the reply arrived, Unix seconds.
    pub at: f64,
    pub rtt_ms: f64,
}

impl Reply {
    /// When the request left, Unix seconds.
    pub fn sent(&self) -> f64 {
        self.at - self.rtt_ms / 1000.0
    }
}

/// A kernel `ping -D -n -i INTERVAL DST` running in the background in a host's namespace, its
/// output in a log file; stopped with SIGINT, which makes ping print its summary.
pub struct PingStream {
    proc: Proc,
    log: PathBuf,
    interval: Duration,
}

impl PingStream {
    /// Starts pinging `dst` from `host` every `interval` (`ping -i`; below 200 ms needs root).
    pub fn start(host: &Host, dst: &str, interval: Duration, label: &str) -> Result<PingStream> {
        let log = host.log_path(&format!("ping-{label}"));
        let i = format!("{:.3}", interval.as_secs_f64());
        let proc = host.spawn(&["ping", "-D", "-n", "-i", i.as_str(), dst], &log)?;
        Ok(PingStream {
            proc,
            log,
            interval,
        })
    }

    /// The replies so far.
    pub fn snapshot(&self) -> Result<PingLog> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(PingLog::parse(&text, self.interval))
    }

    /// Stops ping (SIGINT, SIGKILL if it lingers) and returns everything it printed.
    pub fn stop(self) -> Result<PingLog> {
        self.proc.signal(libc::SIGINT)?;
        if self.proc.wait_timeout(Duration::from_secs(5))?.is_none() {
            self.proc.terminate(Duration::from_secs(1))?;
        }
        self.snapshot()
    }
}

/// What a `ping -D` printed: every reply, and the summary if it got that far.
#[derive(Clone, Debug, Default)]
pub struct PingLog {
    /// In arrival order.
    pub replies: Vec<Reply>,
    pub transmitted: Option<u32>,
    pub received: Option<u32>,
    /// The interval the requests were sent at.
    pub interval: Duration,
}

/// The worst interruption of a ping stream inside a time window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outage {
    /// The longest interval without a delivered reply, within the window.
    pub gap: Duration,
    /// Requests sent inside the window that were never answered (excluding those still in
    /// flight when ping stopped).
    pub lost: u32,
    /// When the longest gap ended (the reply that ended it arrived), Unix seconds.
    pub gap_end: Option<f64>,
    /// Replies to requests sent inside the window.
    pub delivered: u32,
}

impl PingLog {
    /// Parses iputils output with `-D`: `[1712345678.123456] 64 bytes from 10.66.0.5:
    /// icmp_seq=12 ttl=64 time=80.9 ms`; other lines are skipped, the summary is read.
    pub fn parse(text: &str, interval: Duration) -> PingLog {
        let mut replies = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix('[') else {
                continue;
            };
            let Some((stamp, rest)) = rest.split_once(']') else {
                continue;
            };
            let Ok(at) = stamp.parse::<f64>() else {
                continue;
            };
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_owned)
            };
            let seq = field("icmp_seq=").and_then(|s| s.parse::<u32>().ok());
            let rtt = field("time=").and_then(|s| s.parse::<f64>().ok());
            if let (Some(seq), Some(rtt_ms)) = (seq, rtt) {
                replies.push(Reply { seq, at, rtt_ms });
            }
        }
        let summary = crate::ping::parse_summary(text);
        PingLog {
            replies,
            transmitted: summary.map(|s| s.transmitted),
            received: summary.map(|s| s.received),
            interval,
        }
    }

    /// The worst interruption within `[from, to)` (Unix seconds): the longest interval between
    /// consecutive replies, clipped to the window (a window with no reply counts whole), and
    /// the requests sent inside it that were lost.
    pub fn outage(&self, from: f64, to: f64) -> Outage {
        let mut by_arrival: Vec<Reply> = self.replies.clone();
        by_arrival.sort_by(|x, y| x.at.total_cmp(&y.at));
        // Silences are clipped to the window, so one that began earlier (an earlier outage)
        // counts only for its part inside.
        let mut gap = 0.0f64;
        let mut gap_end = None;
        for w in by_arrival.windows(2) {
            let (x, y) = (w[0], w[1]);
            let silent = y.at.min(to) - x.at.max(from);
            if y.at >= from && x.at < to && silent > gap {
                gap = silent;
                gap_end = Some(y.at);
            }
        }
        if !by_arrival.iter().any(|r| r.at >= from) {
            gap = to - from;
            gap_end = None;
        }

        // Lost requests: missing sequence numbers between answered ones, each placed in time
        // between the send times of its answered neighbours.
        let mut by_seq: Vec<Reply> = self.replies.clone();
        by_seq.sort_by_key(|r| r.seq);
        by_seq.dedup_by_key(|r| r.seq);
        let mut lost = 0;
        for w in by_seq.windows(2) {
            let (x, y) = (w[0], w[1]);
            let missing = y.seq.saturating_sub(x.seq).saturating_sub(1);
            if missing == 0 {
                continue;
            }
            let step = (y.sent() - x.sent()) / f64::from(y.seq - x.seq);
            for k in 1..=missing {
                let sent = x.sent() + step * f64::from(k);
                if sent >= from && sent < to {
                    lost += 1;
                }
            }
        }
        let delivered = by_seq
            .iter()
            .filter(|r| r.sent() >= from && r.sent() < to)
            .count();
        Outage {
            gap: Duration::from_secs_f64(gap.max(0.0)),
            lost,
            gap_end,
            delivered: u32::try_from(delivered).unwrap_or(u32::MAX),
        }
    }

    /// Replies to requests sent in `[from, to)`.
    pub fn replies_sent_in(&self, from: f64, to: f64) -> Vec<Reply> {
        self.replies
            .iter()
            .filter(|r| r.sent() >= from && r.sent() < to)
            .copied()
            .collect()
    }

    /// The send time of the first request after `from` that starts a run of replies with RTTs
    /// below `rtt_ms` (e.g. back on the direct path) lasting at least `hold` seconds: when the
    /// stream settled there (one slow reply later, a scheduling hiccup, does not move it).
    pub fn settled_below(&self, from: f64, rtt_ms: f64, hold: f64) -> Option<f64> {
        let mut after = self.replies_sent_in(from, f64::INFINITY);
        after.sort_by(|x, y| x.sent().total_cmp(&y.sent()));
        let mut start: Option<f64> = None;
        for r in &after {
            if r.rtt_ms >= rtt_ms {
                start = None;
                continue;
            }
            let s = *start.get_or_insert(r.sent());
            if r.sent() - s >= hold {
                return Some(s);
            }
        }
        None
    }

    /// The median RTT of replies to requests sent in `[from, to)`.
    pub fn median_rtt(&self, from: f64, to: f64) -> Option<f64> {
        let mut rtts: Vec<f64> = self
            .replies_sent_in(from, to)
            .iter()
            .map(|r| r.rtt_ms)
            .collect();
        rtts.sort_by(f64::total_cmp);
        rtts.get(rtts.len() / 2).copied()
    }
}
