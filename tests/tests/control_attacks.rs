//! Attacks on the control plane over the network: the real `rally-control` binary on a lab host,
//! an attack client speaking the real QUIC control protocol from other hosts
//! ([`rally_lab::attack::control`]), and real agents where a victim is needed. Build the
//! binaries first: `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rally_lab::attack::control::{identity, in_ns, wg_key, ControlClient};
use rally_lab::{with_lab, Agent, ControlPlane, Host};
use rally_proto::control::{NatReport, RelayLatency, MAX_NAT_RELAYS};
use rally_proto::{ErrorCode, Key32, Request, ServerMsg};

const CONNECT: Duration = Duration::from_secs(20);

/// The control plane's address and key, for the attack client.
fn target(cp: &ControlPlane) -> Result<(SocketAddr, Key32)> {
    let addr = cp.addr().parse().context("control address")?;
    let key = cp
        .key()
        .parse()
        .map_err(|e| anyhow::anyhow!("control key: {e:?}"))?;
    Ok((addr, key))
}

#[test]
fn a_registration_flood_from_one_address_is_refused_after_the_limit() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start_with(
            &lab.add_host("control")?,
            lab,
            &[],
            &["--register-burst", "5", "--register-refill-secs", "3600"],
        )?;
        let (addr, key) = target(&cp)?;
        let attacker = lab.add_host("attacker")?;
        let outcomes: Vec<Option<ErrorCode>> = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let mut out = Vec::new();
                for n in 0..8 {
                    let mut c = ControlClient::connect(addr, key).await?;
                    let r = c
                        .register(&identity(n), &format!("throwaway{n}"), wg_key(n))
                        .await?;
                    out.push(r.err().map(|e| e.code));
                    c.close().await;
                }
                Ok(out)
            })
        })?;
        let accepted = outcomes.iter().filter(|o| o.is_none()).count();
        ensure!(
            accepted == 5,
            "{accepted} of 8 new identities accepted: {outcomes:?}"
        );
        ensure!(
            outcomes[5..]
                .iter()
                .all(|o| *o == Some(ErrorCode::RegistrationRefused)),
            "{outcomes:?}"
        );
        // A known identity still re-registers from that address, and a real agent elsewhere
        // registers as usual.
        let again = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let mut c = ControlClient::connect(addr, key).await?;
                let r = c.register(&identity(0), "throwaway0", wg_key(0)).await?;
                Ok(r.is_ok())
            })
        })?;
        ensure!(again, "a known identity was refused");
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        Ok(())
    })
}

#[test]
fn an_oversized_nat_report_or_frame_is_refused_and_never_reaches_the_party() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let (addr, key) = target(&cp)?;
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        let code = alice.party_create("lan", &[])?;
        let attacker = lab.add_host("attacker")?;
        let (report, frame) = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let mut c = ControlClient::connect(addr, key).await?;
                c.register(&identity(1), "mallory", wg_key(1))
                    .await?
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                c.request(Request::JoinParty { code }).await??;
                let huge = NatReport {
                    relays: (0..=MAX_NAT_RELAYS)
                        .map(|i| RelayLatency {
                            name: format!("r{i}"),
                            addr: format!("{}:3478", "x".repeat(200)),
                            latency_ms: Some(1.0),
                        })
                        .collect(),
                    ..NatReport::default()
                };
                let report = c.request(Request::ReportNat { nat: huge }).await?;
                // A frame announcing 1 MiB: refused from its length prefix.
                c.send_raw(&(1u32 << 20).to_be_bytes()).await?;
                let frame = loop {
                    match c.recv().await? {
                        ServerMsg::Error(e) => break e.code,
                        _ => continue,
                    }
                };
                Ok((report, frame))
            })
        })?;
        ensure!(
            matches!(&report, Err(e) if e.code == ErrorCode::TooLarge),
            "oversized NAT report: {report:?}"
        );
        ensure!(frame == ErrorCode::TooLarge, "oversized frame: {frame:?}");
        // Alice saw mallory join, but never a NAT report from it.
        alice.wait_for_peers(&["mallory"], CONNECT)?;
        let peers = alice.peers_json()?;
        let text = peers.to_string();
        ensure!(
            !text.contains("xxxxxxxxxx"),
            "the report reached alice: {text}"
        );
        alice.wait_control_connected(CONNECT)?;
        Ok(())
    })
}

#[test]
fn claiming_another_members_wireguard_key_is_refused() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let (addr, key) = target(&cp)?;
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        let code = alice.party_create("lan", &[])?;
        let attacker = lab.add_host("attacker")?;
        let claim = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                // A member learns alice's WireGuard key from its peer map…
                let mut c = ControlClient::connect(addr, key).await?;
                c.register(&identity(1), "mallory", wg_key(1))
                    .await?
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                c.request(Request::JoinParty { code }).await??;
                let map = c.peer_map().await?;
                let alice_wg = map
                    .iter()
                    .find(|p| p.name == "alice")
                    .context("alice in the peer map")?
                    .wg_key;
                // …and re-registers claiming it, as itself and as a fresh identity.
                let mut same = ControlClient::connect(addr, key).await?;
                let as_member = same.register(&identity(1), "mallory", alice_wg).await?;
                let mut fresh = ControlClient::connect(addr, key).await?;
                let as_new = fresh.register(&identity(2), "eve", alice_wg).await?;
                Ok((
                    as_member.err().map(|e| e.code),
                    as_new.err().map(|e| e.code),
                ))
            })
        })?;
        ensure!(
            claim == (Some(ErrorCode::KeyInUse), Some(ErrorCode::KeyInUse)),
            "claims of alice's key: {claim:?}"
        );
        Ok(())
    })
}

#[test]
fn a_second_member_with_a_taken_name_is_listed_as_name_2_for_everyone() -> Result<()> {
    // Two agents both called "laptop" join alice's party: the second is "laptop-2" for everyone,
    // so a name resolved by the CLI (`rally ping laptop`) cannot land on the impostor.
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        let code = alice.party_create("home", &[])?;
        let first = Agent::start(&lab.add_host("lap1")?, "laptop", None)?;
        rally_lab::host::check_success(&first.party_join(&code)?, "first laptop joins")?;
        alice.wait_for_peers(&["laptop"], CONNECT)?;
        let second = Agent::start(&lab.add_host("lap2")?, "laptop", None)?;
        rally_lab::host::check_success(&second.party_join(&code)?, "second laptop joins")?;
        let peers = alice.wait_for_peers(&["laptop", "laptop-2"], CONNECT)?;
        let vip_of = |name: &str| {
            peers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.virtual_ip.clone())
                .context("peer listed")
        };
        ensure!(
            vip_of("laptop")? == first.virtual_ip()?.to_string(),
            "\"laptop\" is not the first laptop: {peers:?}"
        );
        ensure!(
            vip_of("laptop-2")? == second.virtual_ip()?.to_string(),
            "\"laptop-2\" is not the second laptop: {peers:?}"
        );
        // And the second laptop knows its own name.
        let own = second.status()?.name;
        ensure!(own == "laptop-2", "the second laptop calls itself {own:?}");
        Ok(())
    })
}

#[test]
fn connections_beyond_the_per_address_cap_are_refused() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start_with(
            &lab.add_host("control")?,
            lab,
            &[],
            &["--max-connections-per-ip", "3"],
        )?;
        let (addr, key) = target(&cp)?;
        let attacker = lab.add_host("attacker")?;
        let (held, fourth) = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let mut open = Vec::new();
                for _ in 0..3 {
                    open.push(ControlClient::handshake(addr, key).await?);
                }
                let fourth = ControlClient::handshake(addr, key).await;
                let held = open.len();
                for (_, conn) in &open {
                    conn.close(0u32.into(), b"");
                }
                Ok((held, fourth.err().map(|e| format!("{e:#}"))))
            })
        })?;
        ensure!(held == 3, "{held} connections held");
        let refusal = fourth.context("a fourth connection from one address was accepted")?;
        ensure!(refusal.contains("refused"), "unexpected refusal: {refusal}");
        // Another address is not affected.
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        Ok(())
    })
}

#[test]
fn a_client_that_never_reads_is_stopped_being_read() -> Result<()> {
    // Every request gets a reply; a client that never reads them fills its own receive window,
    // then the session's bounded queue, and from then on the control plane stops reading its
    // requests: its writes stall for good instead of the control plane's memory growing. (With
    // an unbounded queue the writes only pause while a slow debug build catches up, and reach
    // MAX; the stall window is long enough to tell the two apart.)
    const MAX: usize = 200_000;
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let (addr, key) = target(&cp)?;
        let attacker = lab.add_host("attacker")?;
        let pid = cp.pid().context("control plane pid")?;
        let rss0 = rally_lab::bench::tools::status_kib(pid, "VmRSS")?;
        let sent = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let mut c = ControlClient::connect(addr, key).await?;
                c.register(&identity(1), "mallory", wg_key(1))
                    .await?
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let request = rally_proto::frame::encode(&rally_proto::ClientMsg::Request {
                    id: 1,
                    body: Request::ListParties,
                });
                c.flood_without_reading(&request, MAX, Duration::from_secs(10))
                    .await
            })
        })?;
        ensure!(
            sent < MAX,
            "the control plane kept reading {MAX} requests whose replies were never read"
        );
        let rss1 = rally_lab::bench::tools::status_kib(pid, "VmRSS")?;
        println!("writes stalled after {sent} requests; control plane VmRSS {rss0} -> {rss1} KiB");
        // Others are served meanwhile.
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        Ok(())
    })
}

#[test]
fn above_the_retry_threshold_clients_prove_their_address_first() -> Result<()> {
    // `--retry-above 0`: every new connection gets a QUIC Retry; a real client answers it and
    // connects, and the control plane counts the retries.
    with_lab(|lab| {
        let host = lab.add_host("control")?;
        let metrics = format!("{}:9100", host.ip());
        let cp = ControlPlane::start_with(
            &host,
            lab,
            &[],
            &["--retry-above", "0", "--metrics", &metrics],
        )?;
        let alice = Agent::start(&lab.add_host("alice")?, "alice", cp.control())?;
        alice.wait_control_connected(CONNECT)?;
        let text = http_get(&host, &metrics)?;
        let retries = text
            .lines()
            .find_map(|l| l.strip_prefix("rally_control_retries_total "))
            .context("no rally_control_retries_total")?
            .trim()
            .parse::<f64>()?;
        ensure!(retries >= 1.0, "no retry counted:\n{text}");
        Ok(())
    })
}

#[test]
fn a_second_control_plane_on_the_same_data_directory_is_refused() -> Result<()> {
    with_lab(|lab| {
        let host = lab.add_host("control")?;
        let _cp = ControlPlane::start(&host, lab)?;
        let out = second_serve(lab, &host)?;
        ensure!(
            out.status.code() == Some(1),
            "second serve exited with {:?}",
            out.status
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        ensure!(
            lines.len() == 1 && lines[0].contains("another rally-control is serving"),
            "stderr: {stderr}"
        );
        Ok(())
    })
}

/// `rally-control serve` again on the data directory `ControlPlane::start` used.
fn second_serve(lab: &rally_lab::Lab, host: &Host) -> Result<std::process::Output> {
    let bin = rally_lab::bins::rally_control()?;
    let data = lab.dir().join(format!("control-{}", host.name()));
    host.run_timeout(
        &[
            bin.to_string_lossy().as_ref(),
            "serve",
            "--data-dir",
            data.to_string_lossy().as_ref(),
            "--listen",
            &format!("{}:7444", host.ip()),
        ],
        Duration::from_secs(20),
    )
}

/// `GET /metrics` from `host` (bash's /dev/tcp: no HTTP client needed in the namespace).
fn http_get(host: &Host, addr: &str) -> Result<String> {
    let (ip, port) = addr.split_once(':').context("addr")?;
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port}; printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = host.run_ok(&["bash", "-c", &script])?;
    ensure!(
        out.starts_with("HTTP/1.1 200"),
        "bad answer from {addr}: {out}"
    );
    Ok(out)
}
