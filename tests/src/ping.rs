//! Reading the output of kernel `ping` (iputils) and `rally ping`.

/// Which path answered a `rally ping`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PingPath {
    /// The direct (peer-to-peer) path.
    Direct,
    /// A relay, by name.
    Relay(String),
}

/// Counts from a ping's summary line (`40 packets transmitted, 38 received, …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingSummary {
    pub transmitted: u32,
    pub received: u32,
}

impl PingSummary {
    /// Received / transmitted (0 when nothing was sent).
    pub fn ratio(&self) -> f64 {
        if self.transmitted == 0 {
            0.0
        } else {
            f64::from(self.received) / f64::from(self.transmitted)
        }
    }
}

/// Parses the `N packets transmitted, M received` summary (iputils; `rally ping` may use it too).
pub fn parse_summary(text: &str) -> Option<PingSummary> {
    let line = text.lines().find(|l| l.contains("transmitted"))?;
    let mut transmitted = None;
    let mut received = None;
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u32>() else {
            continue;
        };
        if what.starts_with("packets") || what == "transmitted" {
            transmitted = Some(n);
        } else if what == "received" || what.starts_with("repl") {
            received = Some(n);
        }
    }
    Some(PingSummary {
        transmitted: transmitted?,
        received: received?,
    })
}

/// The first round-trip time in milliseconds, from `time=1.23 ms` (or `time=1.23ms`, `time<1 ms`).
pub fn parse_rtt_ms(text: &str) -> Option<f64> {
    let mut rest = text;
    while let Some(at) = rest.find("time") {
        let after = &rest[at + 4..];
        let value = after.strip_prefix('=').or_else(|| after.strip_prefix('<'));
        if let Some(value) = value {
            let number: String = value
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let unit = value.trim_start()[number.len()..].trim_start();
            if let (Ok(ms), true) = (number.parse::<f64>(), unit.starts_with("ms")) {
                return Some(ms);
            }
        }
        rest = after;
    }
    None
}

/// Round-trip statistics from iputils' `rtt min/avg/max/mdev = …` line, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RttStats {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// Parses iputils' `rtt min/avg/max/mdev = 80.1/80.5/81.0/0.2 ms` line.
pub fn parse_rtt_stats(text: &str) -> Option<RttStats> {
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.trim();
    let mut numbers = values
        .split_whitespace()
        .next()?
        .split('/')
        .map(|v| v.parse::<f64>().ok());
    Some(RttStats {
        min: numbers.next()??,
        avg: numbers.next()??,
        max: numbers.next()??,
    })
}

/// The path named in `rally ping` output: `relay:NAME` or the word `direct`.
pub fn parse_path(text: &str) -> Option<PingPath> {
    let is_sep = |c: char| {
        c.is_whitespace() || matches!(c, ',' | ';' | '=' | '(' | ')' | '[' | ']' | '"' | '\'')
    };
    let words: Vec<&str> = text.split(is_sep).filter(|w| !w.is_empty()).collect();
    for word in &words {
        if let Some(name) = word.strip_prefix("relay:") {
            let name = name.trim_end_matches(['.', ':']);
            if !name.is_empty() {
                return Some(PingPath::Relay(name.to_owned()));
            }
        }
    }
    let direct = words.iter().any(|w| {
        w.trim_end_matches(['.', ':'])
            .eq_ignore_ascii_case("direct")
    });
    direct.then_some(PingPath::Direct)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPUTILS: &str = "PING 10.66.1.2 (10.66.1.2) 56(84) bytes of data.
64 bytes from 10.66.1.2: icmp_seq=1 ttl=64 time=0.853 ms
64 bytes from 10.66.1.2: icmp_seq=2 ttl=64 time=0.412 ms

--- 10.66.1.2 ping statistics ---
40 packets transmitted, 38 received, 5% packet loss, time 7801ms
rtt min/avg/max/mdev = 0.300/0.512/0.853/0.100 ms
";

    #[test]
    fn iputils_summary_and_rtt() {
        let s = parse_summary(IPUTILS).expect("summary");
        assert_eq!(
            s,
            PingSummary {
                transmitted: 40,
                received: 38
            }
        );
        assert!((s.ratio() - 0.95).abs() < 1e-9);
        assert_eq!(parse_rtt_ms(IPUTILS), Some(0.853));
    }

    #[test]
    fn rtt_statistics() {
        let s = parse_rtt_stats(IPUTILS).expect("stats");
        assert_eq!(
            s,
            RttStats {
                min: 0.3,
                avg: 0.512,
                max: 0.853
            }
        );
        assert_eq!(parse_rtt_stats("3 packets transmitted, 0 received"), None);
    }

    #[test]
    fn summary_with_errors_and_total_loss() {
        let text = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2030ms";
        assert_eq!(
            parse_summary(text),
            Some(PingSummary {
                transmitted: 3,
                received: 0
            })
        );
        assert_eq!(
            PingSummary {
                transmitted: 0,
                received: 0
            }
            .ratio(),
            0.0
        );
        assert_eq!(parse_summary("no summary here"), None);
    }

    #[test]
    fn rtt_variants() {
        assert_eq!(
            parse_rtt_ms("reply from bob via direct: time=1.23 ms"),
            Some(1.23)
        );
        assert_eq!(parse_rtt_ms("time=12ms"), Some(12.0));
        assert_eq!(parse_rtt_ms("time<1 ms"), Some(1.0));
        assert_eq!(parse_rtt_ms("uptime 3s, time=4.5 ms"), Some(4.5));
        assert_eq!(parse_rtt_ms("timeout"), None);
        assert_eq!(parse_rtt_ms("time=abc"), None);
    }

    #[test]
    fn path_variants() {
        assert_eq!(
            parse_path("reply from bob (10.66.0.5) via direct time=1.2 ms"),
            Some(PingPath::Direct)
        );
        assert_eq!(
            parse_path("seq=1 path=relay:eu-1 time=30 ms"),
            Some(PingPath::Relay("eu-1".into()))
        );
        assert_eq!(
            parse_path("seq=1 via relay:eu-1 time=30 ms"),
            Some(PingPath::Relay("eu-1".into()))
        );
        assert_eq!(parse_path("Direct: time=1 ms"), Some(PingPath::Direct));
        assert_eq!(parse_path("no answer"), None);
        assert_eq!(parse_path("indirect"), None);
    }
}
