//! Unit tests of the generator's helpers.

use super::load::{hex, port_drops, unhex32};
use super::*;

#[test]
fn port_drops_reads_the_row_bound_to_the_port() {
    let table = "  sl local_address rem_address st tx_queue:rx_queue tr:tm retr uid timeout inode ref pointer drops
  1: 0A000002:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 111 2 0000000000000000 17
  2: 0A000002:0FA0 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 222 2 0000000000000000 5
";
    assert_eq!(port_drops(table, 3478), Some(17));
    assert_eq!(port_drops(table, 4000), Some(5));
    assert_eq!(port_drops(table, 4001), None);
}

#[test]
fn hex_round_trips() {
    let b = random32();
    assert_eq!(unhex32(&hex(&b)).expect("hex"), b);
    assert!(unhex32("zz").is_err());
}
