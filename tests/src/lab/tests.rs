//! Unit tests of the address plan, the cut table and host-name checks.

use super::links::cut_ruleset;
use super::*;

#[test]
fn hosts_get_consecutive_documentation_addresses() {
    assert_eq!(host_ip(0).expect("first"), Ipv4Addr::new(198, 51, 100, 10));
    assert_eq!(host_ip(1).expect("second"), Ipv4Addr::new(198, 51, 100, 11));
    assert_eq!(host_ip(89).expect("last"), Ipv4Addr::new(198, 51, 100, 99));
    assert!(host_ip(90).is_err());
}

#[test]
fn routers_get_their_own_range() {
    assert_eq!(
        router_ip(0).expect("first"),
        Ipv4Addr::new(198, 51, 100, 100)
    );
    assert_eq!(
        router_ip(149).expect("last"),
        Ipv4Addr::new(198, 51, 100, 249)
    );
    assert!(router_ip(150).is_err());
}

#[test]
fn cut_table_drops_listed_address_pairs() {
    let rules = cut_ruleset();
    assert!(rules.contains("table bridge rally_lab {"), "{rules}");
    assert!(rules.contains("ip saddr . ip daddr @cut drop"), "{rules}");
}

#[test]
fn host_names_are_checked() {
    for ok in ["alice", "bob2", "nat-a"] {
        assert!(validate_host_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "Alice",
        "a b",
        "a/b",
        "inet",
        "a-very-long-host-name-indeed",
    ] {
        assert!(validate_host_name(bad).is_err(), "{bad}");
    }
}
