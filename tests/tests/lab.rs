//! The lab itself: namespaces, the bridge, routers, WAN emulators, process tracking and
//! teardown. Needs root, not the Rally binaries.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use rally_lab::ping::parse_summary;
use rally_lab::{netns, Lab, NatKind, WanProfile};

/// Namespaces on the machine whose names start with `prefix`.
fn namespaces_with(prefix: &str) -> Result<Vec<String>> {
    Ok(netns::list()?
        .into_iter()
        .filter(|ns| ns.starts_with(prefix))
        .collect())
}

#[test]
fn two_hosts_reach_each_other_over_the_bridge_and_teardown_removes_everything() -> Result<()> {
    let lab = Lab::new()?;
    let a = lab.add_host("a")?;
    let b = lab.add_host("b")?;
    assert_eq!(a.ip().to_string(), "198.51.100.10");
    assert_eq!(b.ip().to_string(), "198.51.100.11");
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = from.run(&["ping", "-c", "2", "-W", "2", &to.ip().to_string()])?;
        assert!(
            out.status.success(),
            "{} could not ping {}: {}",
            from.name(),
            to.ip(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let addr = a.run_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addr.contains("198.51.100.10/24"), "{addr}");

    let sleeper = a.spawn(&["sleep", "300"], a.log_path("sleep"))?;
    assert!(sleeper.is_running());
    let prefix = lab.prefix().to_owned();
    let made = namespaces_with(&prefix)?;
    assert_eq!(made.len(), 3, "{made:?}");
    let dir = lab.dir().to_path_buf();

    drop(lab);
    assert!(!sleeper.is_running(), "the lab's process survived teardown");
    assert_eq!(namespaces_with(&prefix)?, Vec::<String>::new());
    assert!(
        !dir.exists(),
        "scratch dir {} survived teardown",
        dir.display()
    );
    Ok(())
}

#[test]
fn teardown_runs_when_a_test_panics() -> Result<()> {
    let mut seen = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new().expect("lab");
        let host = lab.add_host("doomed").expect("host");
        let sleeper = host
            .spawn(&["sleep", "300"], host.log_path("sleep"))
            .expect("spawn");
        seen = Some((lab.prefix().to_owned(), sleeper));
        panic!("deliberate panic to test teardown");
    }));
    assert!(result.is_err());
    let (prefix, sleeper) = seen.expect("the lab was made");
    assert!(!sleeper.is_running(), "the lab's process survived a panic");
    assert_eq!(namespaces_with(&prefix)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn namespaces_of_dead_runs_are_removed() -> Result<()> {
    // A pid that surely belongs to no live process: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn()?;
    let dead_pid = child.id();
    child.wait()?;
    let stale = format!("{}stale", netns::lab_prefix(dead_pid, 0));
    netns::add(&stale)?;
    // (A lab made by a test running in parallel may already remove it here.)

    let _lab = Lab::new()?;
    assert_eq!(
        namespaces_with(&stale)?,
        Vec::<String>::new(),
        "stale namespace survived Lab::new"
    );
    Ok(())
}

#[test]
fn run_times_out_and_reports_failures() -> Result<()> {
    let lab = Lab::new()?;
    let h = lab.add_host("h")?;
    let out = h.run(&["sh", "-c", "echo oops >&2; exit 4"])?;
    assert_eq!(out.status.code(), Some(4));
    let err = h
        .run_timeout(&["sleep", "30"], Duration::from_millis(300))
        .expect_err("must time out");
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    let err = h.run_ok(&["false"]).expect_err("false fails");
    assert!(format!("{err:#}").contains("failed"), "{err:#}");
    Ok(())
}

#[test]
fn wait_timeout_errors_carry_log_tails() -> Result<()> {
    let lab = Lab::new()?;
    let h = lab.add_host("talker")?;
    let p = h.spawn(
        &["sh", "-c", "echo distinctive-log-line; sleep 300"],
        h.log_path("talker"),
    )?;
    lab.wait_until(
        "the log line",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(p.log_text()?.contains("distinctive-log-line")),
    )?;
    let err = lab
        .wait_until(
            "something that never happens",
            Duration::from_millis(100),
            Duration::from_millis(20),
            || Ok(false),
        )
        .expect_err("must time out");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("distinctive-log-line") && msg.contains("never happens"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn background_ping_runs_to_its_summary() -> Result<()> {
    let lab = Lab::new()?;
    let a = lab.add_host("a")?;
    let b = lab.add_host("b")?;
    let target = b.ip().to_string();
    let pinger = a.spawn(
        &["ping", "-i", "0.2", "-c", "10", "-W", "1", target.as_str()],
        a.log_path("ping"),
    )?;
    let status = pinger.wait_timeout(Duration::from_secs(30))?;
    assert!(
        status.is_some_and(|s| s.success()),
        "ping did not succeed: {status:?}"
    );
    let log = pinger.log_text()?;
    let summary = parse_summary(&log).expect("ping prints a summary");
    assert_eq!((summary.transmitted, summary.received), (10, 10), "{log}");
    Ok(())
}

#[test]
fn hosts_behind_one_home_router_share_its_address_and_reach_each_other() -> Result<()> {
    let lab = Lab::new()?;
    let public = lab.add_host("public")?;
    let router = lab.add_router("home", NatKind::HomeRouter)?;
    let a = lab.add_host_behind(&router, "a")?;
    let b = lab.add_host_behind(&router, "b")?;
    assert_eq!(router.wan_ip().to_string(), "198.51.100.100");
    assert_eq!(router.lan_ip().to_string(), "192.168.1.1");
    assert_eq!(a.ip().to_string(), "192.168.1.10");
    assert_eq!(b.ip().to_string(), "192.168.1.11");
    assert_eq!(
        (a.public_ip(), b.public_ip()),
        (router.wan_ip(), router.wan_ip())
    );
    assert_eq!(a.router(), Some("home"));
    assert_eq!(public.router(), None);

    for (from, to) in [(&a, b.ip()), (&b, a.ip()), (&a, public.ip())] {
        let out = from.run(&["ping", "-c", "1", "-W", "2", &to.to_string()])?;
        assert!(
            out.status.success(),
            "{} could not ping {to}: {}",
            from.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The router's own namespace: forwarding on, its ruleset loaded. The internet: off.
    let forwarding = router
        .host()
        .run_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    assert_eq!(forwarding.trim(), "1");
    let rules = router.host().run_ok(&["nft", "list", "ruleset"])?;
    assert!(rules.contains("masquerade"), "{rules}");
    let inet = netns::exec(lab.internet_ns(), &["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    assert_eq!(inet.trim(), "0");
    Ok(())
}

#[test]
fn wan_settings_need_an_emulated_uplink() -> Result<()> {
    let lab = Lab::new()?;
    let plain = lab.add_host("plain")?;
    let wan = lab.add_wan_host("wan")?;
    let router = lab.add_router("r", NatKind::FullCone)?;
    let inside = lab.add_host_behind(&router, "inside")?;
    let slow = WanProfile::delay(Duration::from_millis(300));

    let err = lab
        .set_wan(&plain, slow)
        .expect_err("plain hosts sit on the bridge");
    assert!(format!("{err:#}").contains("add_wan_host"), "{err:#}");
    lab.set_wan(&wan, slow)?;
    assert_eq!(lab.wan(&wan)?, slow);
    // A host behind a router shares the router's uplink.
    lab.set_wan(&inside, slow.with_loss(0.01))?;
    assert_eq!(lab.wan(&router)?, slow.with_loss(0.01));
    assert!(lab
        .set_wan(&router, WanProfile::default().with_loss(2.0))
        .is_err());
    assert!(lab.cut(&router, &inside).is_err(), "same public address");
    Ok(())
}

#[test]
fn udp_mapping_timeouts_are_set_on_router_and_carrier() -> Result<()> {
    let lab = Lab::new()?;
    let router = lab.add_router("cg", NatKind::Cgnat)?;
    router.set_udp_mapping_timeouts(Duration::from_secs(5), Duration::from_secs(7))?;
    let carrier = router.carrier().expect("carrier");
    for r in [&router, carrier] {
        let text = r.host().run_ok(&[
            "cat",
            "/proc/sys/net/netfilter/nf_conntrack_udp_timeout",
            "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream",
        ])?;
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            ["5", "7"],
            "{}",
            r.name()
        );
    }
    Ok(())
}

#[test]
fn teardown_stops_the_wan_emulators_and_removes_router_namespaces() -> Result<()> {
    let lab = Lab::new()?;
    let router = lab.add_router("gone-r", NatKind::Cgnat)?;
    lab.add_host_behind(&router, "gone-h")?;
    lab.add_wan_host("gone-w")?;
    let prefix = lab.prefix().to_owned();
    assert_eq!(
        namespaces_with(&prefix)?.len(),
        5,
        "inet, carrier, router, host, wan host"
    );
    assert!(emulator_threads().iter().any(|t| t == "wan-gone-r.cgn"));
    assert!(emulator_threads().iter().any(|t| t == "wan-gone-w"));

    drop(lab);
    assert_eq!(namespaces_with(&prefix)?, Vec::<String>::new());
    let left: Vec<String> = emulator_threads()
        .into_iter()
        .filter(|t| t.starts_with("wan-gone-"))
        .collect();
    assert!(
        left.is_empty(),
        "emulator threads survived teardown: {left:?}"
    );
    Ok(())
}

/// Names of this process's threads that run WAN emulators.
fn emulator_threads() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("wan-"))
        .collect()
}

#[test]
fn two_home_routers_can_share_one_carrier() -> Result<()> {
    let lab = Lab::new()?;
    let public = lab.add_host("public")?;
    let cg = lab.add_router("cg", NatKind::Cgnat)?;
    let carrier = cg.carrier().expect("carrier");
    let cg2 = lab.add_router_behind(carrier, "cg2", NatKind::HomeRouter)?;
    let a = lab.add_host_behind(&cg, "a")?;
    let b = lab.add_host_behind(&cg2, "b")?;
    assert_eq!(carrier.lan_subnet().to_string(), "100.64.1.0/24");
    assert_eq!(cg.own_wan_ip().to_string(), "100.64.1.10");
    assert_eq!(cg2.own_wan_ip().to_string(), "100.64.1.11");
    assert_eq!(
        (a.public_ip(), b.public_ip()),
        (carrier.wan_ip(), carrier.wan_ip())
    );
    for h in [&a, &b] {
        let out = h.run(&["ping", "-c", "1", "-W", "2", &public.ip().to_string()])?;
        assert!(
            out.status.success(),
            "{} could not reach the internet",
            h.name()
        );
    }
    Ok(())
}
