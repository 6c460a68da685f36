//! Unit tests of the output parsing helpers and the status/peers JSON types.

use super::*;

#[test]
fn last_line_skips_trailing_blank_lines() {
    assert_eq!(
        last_line("Created party lan.\nrally-abc\n\n"),
        Some("rally-abc")
    );
    assert_eq!(last_line("  key  "), Some("key"));
    assert_eq!(last_line("\n \n"), None);
}

#[test]
fn control_keys_are_recognised() {
    let key = "A".repeat(42) + "_";
    assert!(is_control_key(&key));
    assert!(!is_control_key(&"A".repeat(44)));
    assert!(!is_control_key(&("A".repeat(42) + "=")));
}

#[test]
fn altering_changes_exactly_one_character() {
    let code = "rally-AQIDBAUGBwgJ";
    for i in 6..code.len() {
        let altered = alter_one_char(code, i).expect("in range");
        let diffs = code
            .chars()
            .zip(altered.chars())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diffs, 1, "index {i}");
        assert_eq!(altered.len(), code.len());
    }
    assert!(alter_one_char(code, code.len()).is_err());
}

#[test]
fn status_and_peers_json_are_read() {
    let status: Status = serde_json::from_str(
        r#"{"name":"alice","peer_id":"p1","virtual_ip":"10.66.0.5","control":{"connected":true},
           "nat":{},"parties":[{"name":"lan","id":"x"},"games"]}"#,
    )
    .expect("status parses");
    assert!(status.control.connected);
    assert_eq!(status.party_names(), ["games", "lan"]);
    let peers: Vec<Peer> = serde_json::from_str(
        r#"[{"peer_id":"p2","name":"bob","virtual_ip":"10.66.0.6","strategy":"direct","relay":null,
             "state":"connected","endpoint":"198.51.100.11:51820","latency_ms":0.4,"bytes_sent":1}]"#,
    )
    .expect("peers parse");
    assert_eq!(peers[0].strategy.as_deref(), Some("direct"));
    assert_eq!(peers[0].latency_ms, Some(0.4));
}
