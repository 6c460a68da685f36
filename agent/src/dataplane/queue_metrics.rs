//! The data plane's queue counters and delay histograms, published for the metrics endpoint
//! the same way as [`super::security`]: the data-plane thread stores a snapshot when the
//! engine answers [`EngineCmd::Peers`](super::EngineCmd::Peers), which every scrape asks first.
//!
//! Always kept: the bulk packets' sojourn in the flow queues, per direction. With
//! `RALLY_DATAPLANE_TRACE=1` in the agent's environment (a debug switch: it looks into ICMP
//! payloads) also the age of every ICMP echo (iputils `ping` stamps its send time into it)
//! when it is read from the TUN device and when it has been decrypted, and the UDP socket's
//! receive queue (the kernel's buffer charge) at each read: what [`rally_agent_core::aqm_trace`]
//! says about splitting a round trip into stages. The data-plane thread's scheduler counters
//! (`/proc/thread-self/schedstat`: time on the CPU, time waiting for one) tell queueing from
//! CPU contention.

use std::fmt::Write;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rally_agent_core::aqm_trace::{echo_stamp, Echo, Hist};
use rally_proto::http::write_metric;

use super::queues::QueueStats;

/// The environment variable that turns the ICMP and socket-queue tracing on.
pub const TRACE_ENV: &str = "RALLY_DATAPLANE_TRACE";

/// Where an echo's age is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Point {
    /// Read from the TUN device (before encryption).
    TunRead,
    /// Decrypted, before its TUN write.
    Decrypted,
}

/// The histograms; the echo and socket ones stay empty without [`TRACE_ENV`].
#[derive(Debug, Clone)]
pub(super) struct Trace {
    pub enabled: bool,
    pub sojourn_tx: Hist,
    pub sojourn_rx: Hist,
    /// Indexed by [`Self::slot`]: request/reply × TUN read/decrypted.
    echo: [Hist; 4],
    /// The UDP socket's receive queue (bytes the kernel charges) at each read.
    pub udp_rmem: Hist,
}

impl Trace {
    pub fn from_env() -> Self {
        Trace {
            enabled: std::env::var(TRACE_ENV).is_ok_and(|v| v == "1"),
            sojourn_tx: Hist::delays(),
            sojourn_rx: Hist::delays(),
            echo: std::array::from_fn(|_| Hist::delays()),
            udp_rmem: Hist::bytes(),
        }
    }

    fn slot(echo: Echo, point: Point) -> usize {
        match (echo, point) {
            (Echo::Request, Point::TunRead) => 0,
            (Echo::Request, Point::Decrypted) => 1,
            (Echo::Reply, Point::TunRead) => 2,
            (Echo::Reply, Point::Decrypted) => 3,
        }
    }

    /// Records an ICMP echo's age at `point` (tracing only).
    #[inline]
    pub fn observe(&mut self, point: Point, packet: &[u8]) {
        if !self.enabled {
            return;
        }
        let Some((echo, sent)) = echo_stamp(packet) else {
            return;
        };
        let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) else {
            return;
        };
        if let Some(age) = now.checked_sub(sent) {
            self.echo[Self::slot(echo, point)].record_delay(age);
        }
    }

    /// Records the socket's receive queue (tracing only; one `getsockopt`).
    pub fn observe_socket(&mut self, udp: &impl AsRawFd) {
        if self.enabled {
            if let Some(bytes) = rmem_alloc(udp) {
                self.udp_rmem.record(bytes);
            }
        }
    }

    /// One line for the periodic log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "sojourn_tx_us[{}] sojourn_rx_us[{}]",
            self.sojourn_tx.summary(),
            self.sojourn_rx.summary()
        );
        if self.enabled {
            for (name, h) in ECHO_NAMES.iter().zip(&self.echo) {
                let _ = write!(s, " {name}_us[{}]", h.summary());
            }
            let _ = write!(s, " udp_rmem_bytes[{}]", self.udp_rmem.summary());
        }
        s
    }
}

const ECHO_NAMES: [&str; 4] = [
    "echo_request_tun_read",
    "echo_request_decrypted",
    "echo_reply_tun_read",
    "echo_reply_decrypted",
];

/// The kernel's receive-buffer charge of a socket (`SO_MEMINFO`).
fn rmem_alloc(udp: &impl AsRawFd) -> Option<u64> {
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            udp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0).then_some(u64::from(info[0]))
}

/// The calling thread's scheduler counters: time on a CPU, time runnable but waiting for one,
/// and how many times it was scheduled in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedStat {
    pub on_cpu: Duration,
    pub run_delay: Duration,
    pub slices: u64,
}

impl SchedStat {
    /// From `/proc/thread-self/schedstat` (`None` without schedstats in the kernel).
    pub fn current() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
        Some(SchedStat {
            on_cpu: Duration::from_nanos(it.next()??),
            run_delay: Duration::from_nanos(it.next()??),
            slices: it.next()??,
        })
    }
}

/// What a scrape renders.
struct Snapshot {
    stats: QueueStats,
    trace: Trace,
    sched: Option<SchedStat>,
}

static SNAPSHOT: Mutex<Option<Snapshot>> = Mutex::new(None);

/// Stores the data plane's current counters (on the data-plane thread: its scheduler counters
/// are read there).
pub(super) fn publish(stats: QueueStats, trace: &Trace) {
    let snap = Snapshot {
        stats,
        trace: trace.clone(),
        sched: SchedStat::current(),
    };
    *SNAPSHOT.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
}

/// Appends the last published snapshot as Prometheus text (nothing before the first).
pub fn render(out: &mut String) {
    let guard = SNAPSHOT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = guard.as_ref() else {
        return;
    };
    render_counters(out, &s.stats);
    render_histograms(out, &s.trace);
    if let Some(sc) = s.sched {
        render_sched(out, sc, &s.stats);
    }
}

/// One unlabelled sample.
fn one(v: f64) -> [(String, f64); 1] {
    [(String::new(), v)]
}

/// The queues' counters.
fn render_counters(out: &mut String, st: &QueueStats) {
    let dir = |rx: u64, tx: u64| {
        [
            ("direction=\"rx\"".to_string(), rx as f64),
            ("direction=\"tx\"".to_string(), tx as f64),
        ]
    };
    write_metric(
        out,
        "rally_dataplane_small_packets_total",
        "counter",
        "Small packets handled as they were read, by direction.",
        &dir(st.small_rx, st.small_tx),
    );
    write_metric(
        out,
        "rally_dataplane_bulk_packets_total",
        "counter",
        "Bulk packets queued in the flow queues, by direction.",
        &dir(st.bulk_rx, st.bulk_tx),
    );
    let drops = [("codel", st.codel_drops), ("overflow", st.overflow_drops)]
        .map(|(r, v)| (format!("reason=\"{r}\""), v as f64));
    write_metric(
        out,
        "rally_dataplane_queue_drops_total",
        "counter",
        "Bulk packets the flow queues dropped, by reason.",
        &drops,
    );
    write_metric(
        out,
        "rally_dataplane_ce_marks_total",
        "counter",
        "Bulk packets CoDel marked Congestion Experienced.",
        &one(st.ce_marks as f64),
    );
    write_metric(
        out,
        "rally_dataplane_udp_read_gaps_total",
        "counter",
        "Reads of the UDP socket after an earlier read left it undrained.",
        &one(st.rx_read_gaps.iter().sum::<u64>() as f64),
    );
    write_metric(
        out,
        "rally_dataplane_udp_read_gap_max_seconds",
        "gauge",
        "Longest time the UDP socket waited undrained between two reads.",
        &one(st.max_rx_read_gap.as_secs_f64()),
    );
}

/// The sojourn histograms, and with tracing on the echoes' ages and the receive queue.
fn render_histograms(out: &mut String, t: &Trace) {
    let mut hists = vec![
        (
            "rally_dataplane_sojourn_seconds",
            "direction=\"tx\"",
            &t.sojourn_tx,
            1e6,
        ),
        (
            "rally_dataplane_sojourn_seconds",
            "direction=\"rx\"",
            &t.sojourn_rx,
            1e6,
        ),
    ];
    if t.enabled {
        let points = [
            "echo=\"request\",point=\"tun_read\"",
            "echo=\"request\",point=\"decrypted\"",
            "echo=\"reply\",point=\"tun_read\"",
            "echo=\"reply\",point=\"decrypted\"",
        ];
        hists.extend(
            points
                .iter()
                .zip(&t.echo)
                .map(|(p, h)| ("rally_dataplane_echo_age_seconds", *p, h, 1e6)),
        );
        hists.push((
            "rally_dataplane_udp_receive_queue_bytes",
            "",
            &t.udp_rmem,
            1.0,
        ));
    }
    write_histograms(out, &hists);
}

/// The data-plane thread's scheduler counters.
fn render_sched(out: &mut String, sc: SchedStat, st: &QueueStats) {
    write_metric(
        out,
        "rally_dataplane_thread_realtime",
        "gauge",
        "1 while the data-plane thread holds its real-time priority (bulk traffic flows).",
        &one(f64::from(u8::from(st.realtime))),
    );
    write_metric(
        out,
        "rally_dataplane_thread_realtime_boosts_total",
        "counter",
        "Times the data-plane thread took its real-time priority.",
        &one(st.realtime_boosts as f64),
    );
    write_metric(
        out,
        "rally_dataplane_thread_realtime_breathers_total",
        "counter",
        "Breathers (short sleeps) the data-plane thread took after 2 ms busy in its real-time priority.",
        &one(st.realtime_breathers as f64),
    );
    write_metric(
        out,
        "rally_dataplane_thread_cpu_seconds_total",
        "counter",
        "Time the data-plane thread ran on a CPU.",
        &one(sc.on_cpu.as_secs_f64()),
    );
    write_metric(
        out,
        "rally_dataplane_thread_run_delay_seconds_total",
        "counter",
        "Time the data-plane thread was runnable but waited for a CPU.",
        &one(sc.run_delay.as_secs_f64()),
    );
    write_metric(
        out,
        "rally_dataplane_thread_timeslices_total",
        "counter",
        "Times the data-plane thread was scheduled onto a CPU.",
        &one(sc.slices as f64),
    );
}

/// Prometheus histograms: (name, labels, histogram, its values per unit of the metric).
fn write_histograms(out: &mut String, hists: &[(&str, &str, &Hist, f64)]) {
    let mut last = "";
    for &(name, labels, h, unit) in hists {
        if name != last {
            let _ = writeln!(out, "# TYPE {name} histogram");
            last = name;
        }
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (bound, c) in h.buckets() {
            cum += c;
            let le = bound.map_or("+Inf".to_string(), |b| format!("{}", b as f64 / unit));
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", h.sum() as f64 / unit);
        let _ = writeln!(out, "{name}_count{braces} {}", h.count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat() {
        let s = SchedStat::parse("1500000 250000 42\n").unwrap();
        assert_eq!(s.on_cpu, Duration::from_micros(1500));
        assert_eq!(s.run_delay, Duration::from_micros(250));
        assert_eq!(s.slices, 42);
        assert_eq!(SchedStat::parse("12"), None);
    }

    #[test]
    fn histograms_render_cumulative_buckets() {
        let mut h = Hist::delays();
        h.record(30);
        h.record(3_000);
        let mut out = String::new();
        write_histograms(&mut out, &[("x_seconds", "direction=\"tx\"", &h, 1e6)]);
        assert!(
            out.contains("x_seconds_bucket{direction=\"tx\",le=\"0.00005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{direction=\"tx\",le=\"+Inf\"} 2"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{direction=\"tx\"} 2"), "{out}");
        let mut e = String::new();
        write_histograms(&mut e, &[("e", "", &h, 1e6)]);
        assert!(
            e.contains("e_bucket{le=\"+Inf\"} 2") && e.contains("e_count 2"),
            "{e}"
        );
    }
}
