//! Unit tests of the ping-log analysis and the formatting helpers.

use super::*;

fn line(seq: u32, at: f64, rtt: f64) -> String {
    format!("[{at:.6}] 64 bytes from 10.66.0.5: icmp_seq={seq} ttl=64 time={rtt} ms\n")
}

/// Requests every 10 ms from t=100.0; answered after 80 ms, except seqs 11..=30 (lost),
/// then 160 ms from seq 31 on.
fn sample() -> String {
    let mut text = String::from("PING 10.66.0.5 (10.66.0.5) 56(84) bytes of data.\n");
    for seq in 1..=50u32 {
        let sent = 100.0 + f64::from(seq) * 0.01;
        match seq {
            11..=30 => {}
            1..=10 => text.push_str(&line(seq, sent + 0.080, 80.0)),
            _ => text.push_str(&line(seq, sent + 0.160, 160.0)),
        }
    }
    text.push_str("\n--- 10.66.0.5 ping statistics ---\n");
    text.push_str("50 packets transmitted, 30 received, 40% packet loss, time 500ms\n");
    text
}

#[test]
fn ping_d_lines_and_summary_are_read() {
    let log = PingLog::parse(&sample(), Duration::from_millis(10));
    assert_eq!(log.replies.len(), 30);
    assert_eq!(log.replies[0].seq, 1);
    assert!((log.replies[0].at - 100.09).abs() < 1e-6);
    assert!((log.replies[0].sent() - 100.01).abs() < 1e-6);
    assert_eq!(log.transmitted, Some(50));
    assert_eq!(log.received, Some(30));
}

#[test]
fn the_outage_is_the_longest_silence_and_the_requests_lost_in_it() {
    let log = PingLog::parse(&sample(), Duration::from_millis(10));
    // Last reply before the loss: seq 10 at 100.18; first after: seq 31 at 100.47.
    let o = log.outage(100.055, 101.0);
    assert_eq!(o.lost, 20);
    assert!((o.gap.as_secs_f64() - 0.29).abs() < 1e-6, "{o:?}");
    assert!((o.gap_end.unwrap() - 100.47).abs() < 1e-6);
    assert_eq!(o.delivered, 25); // seqs 6..=10 and 31..=50
                                 // A window before the loss sees none of it.
    let before = log.outage(100.0, 100.095);
    assert_eq!(before.lost, 0);
}

#[test]
fn a_window_without_replies_counts_to_its_end() {
    let log = PingLog::parse(&sample(), Duration::from_millis(10));
    let o = log.outage(101.0, 103.0);
    assert!((o.gap.as_secs_f64() - 2.0).abs() < 1e-6, "{o:?}");
    assert_eq!(o.gap_end, None);
    // A silence that began before the window counts only inside it.
    let o = log.outage(100.3, 100.6);
    assert!((o.gap.as_secs_f64() - 0.17).abs() < 1e-6, "{o:?}");
}

#[test]
fn settling_finds_the_first_request_after_the_last_slow_reply() {
    let text: String = (1..=10u32)
        .map(|seq| {
            let rtt = if seq <= 6 { 160.0 } else { 80.0 };
            line(seq, 200.0 + f64::from(seq) * 0.1 + rtt / 1000.0, rtt)
        })
        .collect();
    let log = PingLog::parse(&text, Duration::from_millis(100));
    let t = log.settled_below(200.0, 120.0, 0.3).expect("settles");
    assert!((t - 200.7).abs() < 1e-6, "{t}");
    assert_eq!(log.settled_below(200.0, 120.0, 0.5), None);
    assert_eq!(log.median_rtt(200.0, 201.5), Some(160.0));
    assert_eq!(log.median_rtt(200.65, 201.5), Some(80.0));
}

#[test]
fn spread_is_median_and_range() {
    let d = |n| Duration::from_millis(n);
    assert_eq!(
        spread(&[d(610), d(380), d(420), d(500), d(400)], ms),
        "420 ms median [380 ms–610 ms]"
    );
    assert_eq!(spread::<Duration>(&[], ms), "-");
}

#[test]
fn json_lines_skip_other_output() {
    let text = "===== lab: starting `rally events` =====\n{\"type\":\"failover\"}\nnot json\n";
    let v = json_lines(text);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["type"], "failover");
}
