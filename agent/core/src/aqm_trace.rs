//! Where a packet's time goes in the data plane, sans-IO: fixed-bucket histograms of delays
//! (and of queue sizes), and the send time an `ping` (iputils) writes into every ICMP echo.
//!
//! The engine records each bulk packet's sojourn in its flow queues, and, with tracing on,
//! the age of every ICMP echo at two points of each agent: when it is read from the TUN device
//! and when it has been decrypted (before its TUN write). The four points of a round trip
//! (request read at the pinging side, request decrypted at the far side, reply read there,
//! reply decrypted back home) split the round trip into stages without any clock shared
//! between processes but the host's own: the lab's hosts are namespaces of one machine.

use std::time::Duration;

/// Upper bounds (µs) of the delay histograms' buckets; a last bucket takes the rest.
pub const DELAY_BOUNDS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
];
/// Upper bounds (bytes) of the queue-size histograms' buckets.
pub const BYTES_BOUNDS: [u64; 10] = [
    0,
    16 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
    8 << 20,
];

/// A histogram over fixed upper bounds (Prometheus style: a value goes to the first bucket
/// whose bound is ≥ it; one more bucket above the last bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    bounds: &'static [u64],
    counts: Vec<u64>,
    sum: u64,
    max: u64,
}

impl Hist {
    pub fn new(bounds: &'static [u64]) -> Self {
        Hist {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0,
            max: 0,
        }
    }

    /// A delay histogram in µs ([`DELAY_BOUNDS_US`]).
    pub fn delays() -> Self {
        Hist::new(&DELAY_BOUNDS_US)
    }

    /// A size histogram in bytes ([`BYTES_BOUNDS`]).
    pub fn bytes() -> Self {
        Hist::new(&BYTES_BOUNDS)
    }

    pub fn record(&mut self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    /// Records a delay in µs.
    pub fn record_delay(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> u64 {
        self.sum
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// (upper bound, count in that bucket); `None` as the bound of the last bucket.
    pub fn buckets(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (self.bounds.get(i).copied(), c))
    }

    /// The bound of the bucket that holds quantile `q` (0..=1): an upper estimate; the largest
    /// value seen for the last bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(
                    self.bounds
                        .get(i)
                        .copied()
                        .unwrap_or(self.max)
                        .min(self.max),
                );
            }
        }
        Some(self.max)
    }

    /// `count`, p50, p99 and max in one short string for logs.
    pub fn summary(&self) -> String {
        match (self.quantile(0.5), self.quantile(0.99)) {
            (Some(p50), Some(p99)) => {
                format!("n={} p50≤{p50} p99≤{p99} max={}", self.count(), self.max)
            }
            _ => "n=0".to_string(),
        }
    }
}

/// An ICMP echo's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    Request,
    Reply,
}

/// The send time iputils `ping` wrote into an IPv4 ICMP echo (a `struct timeval` of two native
/// 64-bit integers right after the ICMP header), as time since the Unix epoch; `None` for any
/// other packet or an implausible stamp.
pub fn echo_stamp(packet: &[u8]) -> Option<(Echo, Duration)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    let echo = match icmp.first()? {
        8 => Echo::Request,
        0 => Echo::Reply,
        _ => return None,
    };
    let sec = i64::from_ne_bytes(icmp.get(8..16)?.try_into().ok()?);
    let usec = i64::from_ne_bytes(icmp.get(16..24)?.try_into().ok()?);
    if sec <= 0 || !(0..1_000_000).contains(&usec) {
        return None;
    }
    Some((
        echo,
        Duration::from_secs(sec as u64) + Duration::from_micros(usec as u64),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_to_the_first_bound_at_or_above_them() {
        let mut h = Hist::delays();
        for v in [0, 25, 26, 1_000, 1_001, 200_000] {
            h.record(v);
        }
        let counts: Vec<u64> = h.buckets().map(|(_, c)| c).collect();
        assert_eq!(counts[0], 2, "0 and 25 in ≤25");
        assert_eq!(counts[1], 1, "26 in ≤50");
        assert_eq!(counts[5], 1, "1000 in ≤1000");
        assert_eq!(counts[6], 1, "1001 in ≤2000");
        assert_eq!(*counts.last().unwrap(), 1, "200 ms above the last bound");
        assert_eq!(h.count(), 6);
        assert_eq!(h.max(), 200_000);
        assert_eq!(h.sum(), 202_052);
    }

    #[test]
    fn quantiles_are_bucket_bounds_capped_by_the_maximum() {
        let mut h = Hist::delays();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..98 {
            h.record(40);
        }
        h.record(3_000);
        h.record(150_000);
        assert_eq!(h.quantile(0.5), Some(50));
        assert_eq!(h.quantile(0.99), Some(5_000));
        assert_eq!(h.quantile(1.0), Some(150_000));
        let mut one = Hist::delays();
        one.record(7);
        assert_eq!(one.quantile(0.5), Some(7), "capped by the largest value");
    }

    fn echo(kind: u8, sec: i64, usec: i64) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 48];
        p[0] = 0x45;
        p[9] = 1;
        p[20] = kind;
        p[28..36].copy_from_slice(&sec.to_ne_bytes());
        p[36..44].copy_from_slice(&usec.to_ne_bytes());
        p
    }

    #[test]
    fn reads_pings_send_time() {
        let t = Duration::from_secs(1_700_000_000) + Duration::from_micros(123_456);
        assert_eq!(
            echo_stamp(&echo(8, 1_700_000_000, 123_456)),
            Some((Echo::Request, t))
        );
        assert_eq!(
            echo_stamp(&echo(0, 1_700_000_000, 123_456)),
            Some((Echo::Reply, t))
        );
    }

    #[test]
    fn other_packets_have_no_stamp() {
        assert_eq!(echo_stamp(&echo(3, 1_700_000_000, 0)), None, "not an echo");
        assert_eq!(echo_stamp(&echo(8, 1_700_000_000, 2_000_000)), None);
        let mut udp = echo(8, 1_700_000_000, 0);
        udp[9] = 17;
        assert_eq!(echo_stamp(&udp), None, "not ICMP");
        assert_eq!(
            echo_stamp(&echo(8, 1, 0)[..30]),
            None,
            "too short for a stamp"
        );
        assert_eq!(echo_stamp(&[0x60; 40]), None, "IPv6");
    }
}
