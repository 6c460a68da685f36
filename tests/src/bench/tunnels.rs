//! The tunnels under test between two lab namespaces, side by side: the raw path (veth → bridge
//! → veth, the ceiling), Rally on a direct path, Rally through a relay (its own pair of hosts,
//! cut from each other so only the relay joins them), boringtun-cli and wireguard-go (each a
//! userspace WireGuard daemon creating a TUN device, configured with `wg` over its UAPI
//! socket).

use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::tools::{self, Tool};
use crate::procs::Proc;
use crate::rally::{last_line, CONTROL_PORT, RELAY_PORT};
use crate::{bins, wait_until, Agent, Host, Lab};

/// iperf3's port on every server host.
pub const IPERF_PORT: u16 = 5201;
/// The relay's metrics port (inside the relay's namespace).
pub const RELAY_METRICS_PORT: u16 = 9100;
/// MTU of every tunnel device (Rally's own).
const TUN_MTU: &str = "1420";
const READY: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// The agent's environment variable that turns its data-plane queues off.
const FIFO_ENV: &str = "RALLY_DATAPLANE_FIFO";

/// The second direct pair's environment when not [`FIFO_ENV`]`=1` (`bench --ab-env`): set once,
/// before the lab is built; its figures are then labelled "rally ab (A/B)".
pub static AB_ENV: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Who carries the packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Raw,
    Rally,
    RallyRelay,
    /// Rally on a direct path with `RALLY_DATAPLANE_FIFO=1`: the data plane before its
    /// queues (arrival order, no AQM), the A/B baseline of the same run.
    RallyFifo,
    Boringtun,
    WireguardGo,
}

impl Subject {
    pub fn label(self) -> &'static str {
        match self {
            Subject::Raw => "raw veth",
            Subject::Rally => "rally (direct)",
            Subject::RallyRelay => "rally (relay)",
            Subject::RallyFifo if AB_ENV.get().is_some() => "rally ab (A/B)",
            Subject::RallyFifo => "rally fifo (A/B)",
            Subject::Boringtun => "boringtun-cli",
            Subject::WireguardGo => "wireguard-go",
        }
    }

    pub fn is_tunnel(self) -> bool {
        self != Subject::Raw
    }
}

/// One way from a client host to a server host.
#[derive(Clone)]
pub struct Path {
    pub subject: Subject,
    pub client: Host,
    pub server: Host,
    /// The server's address on this path.
    pub target: Ipv4Addr,
    /// The data-plane processes (client side, server side), when there are any.
    pub pids: Vec<u32>,
}

/// Every path, and what keeps them up (the lab ends the processes).
pub struct Datapath {
    pub paths: Vec<Path>,
    pub agents: Vec<Agent>,
    pub control: Control,
    pub relay: Option<Proc>,
}

impl Datapath {
    pub fn path(&self, s: Subject) -> Option<&Path> {
        self.paths.iter().find(|p| p.subject == s)
    }
}

/// Which paths to build.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub relay: bool,
    pub references: bool,
    /// A second direct pair of agents (`fa`, `fb`), the same run's A/B baseline: queues off,
    /// or the environment of [`AB_ENV`].
    pub fifo: bool,
}

/// Builds the hosts and every wanted path, and starts an iperf3 server on each server host.
pub fn build(lab: &Lab, want: Want) -> Result<Datapath> {
    let a = lab.add_host("a")?;
    let b = lab.add_host("b")?;
    let c = lab.add_host("control")?;
    let relay_host = if want.relay {
        Some(lab.add_host("relay")?)
    } else {
        None
    };
    let relay_key = control_init(lab, &c, "dp")?;
    let mut relay_specs = Vec::new();
    let mut relay = None;
    if let Some(r) = &relay_host {
        let (proc, spec) = start_relay(r, "r1", &relay_key, true)?;
        relay = Some(proc);
        relay_specs.push(spec);
    }
    let control = serve_control(lab, &c, "dp", relay_key, &relay_specs, &[])?;

    let mut paths = vec![Path {
        subject: Subject::Raw,
        client: a.clone(),
        server: b.clone(),
        target: b.ip(),
        pids: Vec::new(),
    }];
    let mut agents = Vec::new();

    println!("==> rally: control plane, two agents, one party (direct path)");
    let (aa, ab) = rally_pair(&control, &a, &b, "bench", "direct")?;
    paths.push(Path {
        subject: Subject::Rally,
        client: a.clone(),
        server: b.clone(),
        target: ab.virtual_ip()?,
        pids: vec![agent_pid(&aa)?, agent_pid(&ab)?],
    });
    agents.extend([aa, ab]);

    if want.relay {
        println!("==> rally: two more agents, cut from each other (relay path)");
        let ra = lab.add_host("ra")?;
        let rb = lab.add_host("rb")?;
        lab.cut(&ra, &rb)?;
        let (xa, xb) = rally_pair(&control, &ra, &rb, "relayed", "relay")?;
        paths.push(Path {
            subject: Subject::RallyRelay,
            client: ra.clone(),
            server: rb.clone(),
            target: xb.virtual_ip()?,
            pids: vec![agent_pid(&xa)?, agent_pid(&xb)?],
        });
        agents.extend([xa, xb]);
    }

    if want.fifo {
        let (name, value) = AB_ENV
            .get()
            .map_or((FIFO_ENV, "1"), |(n, v)| (n.as_str(), v.as_str()));
        println!("==> rally: two more agents with {name}={value} (direct path, A/B)");
        let fa = lab.add_host("fa")?;
        let fb = lab.add_host("fb")?;
        let (fa_agent, fb_agent) = with_agent_env(&[(name, value)], || {
            rally_pair(&control, &fa, &fb, "fifo", "direct")
        })?;
        paths.push(Path {
            subject: Subject::RallyFifo,
            client: fa.clone(),
            server: fb.clone(),
            target: fb_agent.virtual_ip()?,
            pids: vec![agent_pid(&fa_agent)?, agent_pid(&fb_agent)?],
        });
        agents.extend([fa_agent, fb_agent]);
    }

    if want.references {
        for (subject, net, port) in [
            (Subject::Boringtun, 1u8, 51901u16),
            (Subject::WireguardGo, 2, 51902),
        ] {
            println!("==> {}: two daemons, configured with wg", subject.label());
            paths.push(wireguard_pair(lab, subject, &a, &b, net, port)?);
        }
    }
    Ok(Datapath {
        paths,
        agents,
        control,
        relay,
    })
}

/// Runs `start` with `vars` set in this process's environment, which the agents it starts
/// inherit, and removes them afterwards: nothing else may start processes meanwhile (the lab
/// starts its processes from one thread).
pub fn with_agent_env<T>(vars: &[(&str, &str)], start: impl FnOnce() -> T) -> T {
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let out = start();
    for (name, _) in vars {
        std::env::remove_var(name);
    }
    out
}

/// A control plane: its process, `addr`, key and host.
pub struct Control {
    pub proc: Proc,
    pub addr: String,
    pub key: String,
    pub host: Host,
}

impl Control {
    pub fn target(&self) -> Option<(&str, &str)> {
        Some((&self.addr, &self.key))
    }
}

fn data_dir(lab: &Lab, tag: &str) -> PathBuf {
    lab.dir().join(format!("bench-control-{tag}"))
}

/// `rally-control init` in a fresh data dir named after `tag`; returns the control key.
pub fn control_init(lab: &Lab, host: &Host, tag: &str) -> Result<String> {
    let dir = data_dir(lab, tag);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let bin = bins::rally_control()?.to_string_lossy().into_owned();
    let d = dir.to_string_lossy().into_owned();
    let out = host.run_ok(&[bin.as_str(), "init", "--data-dir", d.as_str()])?;
    last_line(&out)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("rally-control init printed no key"))
}

/// `rally-control serve` from the data dir of `tag` (see `control_init`), waiting until it
/// listens on `host`:7443.
pub fn serve_control(
    lab: &Lab,
    host: &Host,
    tag: &str,
    key: String,
    relays: &[String],
    extra: &[&str],
) -> Result<Control> {
    let bin = bins::rally_control()?.to_string_lossy().into_owned();
    let addr = format!("{}:{CONTROL_PORT}", host.ip());
    let mut args = vec![
        bin,
        "serve".into(),
        "--data-dir".into(),
        data_dir(lab, tag).to_string_lossy().into_owned(),
        "--listen".into(),
        addr.clone(),
    ];
    for r in relays {
        args.extend(["--relay".to_owned(), r.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = host.spawn(&args, host.log_path(&format!("rally-control-{tag}")))?;
    wait_udp_bound(host, CONTROL_PORT, &proc)?;
    Ok(Control {
        proc,
        addr,
        key,
        host: host.clone(),
    })
}

/// `rally-relay serve` on `host`:3478 with the control key, metrics on :9100. With
/// `unlimited`, the per-session packet and byte budgets are lifted far above what the machine
/// can carry (the defaults, 20 kpps and 100 Mbit/s per session, would otherwise be what is
/// measured), and any number of sessions may come from one address.
pub fn start_relay(host: &Host, name: &str, key: &str, unlimited: bool) -> Result<(Proc, String)> {
    start_relay_with(
        host,
        name,
        key,
        unlimited,
        (RELAY_PORT, RELAY_METRICS_PORT),
        &[],
    )
}

/// [`start_relay`] on other ports (`(relay, metrics)`), with `extra` flags after the others.
pub fn start_relay_with(
    host: &Host,
    name: &str,
    key: &str,
    unlimited: bool,
    (port, metrics_port): (u16, u16),
    extra: &[&str],
) -> Result<(Proc, String)> {
    let bin = bins::bin_path("rally-relay")?
        .to_string_lossy()
        .into_owned();
    let addr = format!("{}:{port}", host.ip());
    let metrics = format!("{}:{metrics_port}", host.ip());
    let mut args: Vec<String> = vec![
        bin,
        "serve".into(),
        "--listen".into(),
        addr.clone(),
        // `=`: a key may start with '-'.
        format!("--control-key={key}"),
        "--metrics".into(),
        metrics,
    ];
    if unlimited {
        args.extend(
            [
                "--max-pps",
                "100000000",
                "--max-bps",
                "1000000000000",
                "--max-sessions-per-ip",
                "100000",
                "--max-sessions",
                "100000",
            ]
            .map(String::from),
        );
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let proc = host.spawn(&args, host.log_path(&format!("rally-relay-{name}")))?;
    wait_udp_bound(host, port, &proc)?;
    Ok((proc, format!("{name}={addr}")))
}

/// Waits until something listens on UDP `port` in `host`'s namespace; fails if `proc` exits.
pub fn wait_udp_bound(host: &Host, port: u16, proc: &Proc) -> Result<()> {
    let filter = format!("sport = :{port}");
    wait_until(
        &format!("{} to listen on udp {port}", proc.label()),
        READY,
        POLL,
        || {
            if let Some(status) = proc.try_status()? {
                return Err(anyhow!("{} exited ({status})", proc.label()).context(crate::Abort));
            }
            let out = host.run_ok(&["ss", "-H", "-u", "-l", "-n", filter.as_str()])?;
            Ok(!out.trim().is_empty())
        },
    )
    .map_err(|e| crate::with_logs(e, &host.logs_tail()))
}

/// Two agents on `a` and `b` in one new party, waiting until `a` reaches `b` on `route`
/// (`direct` or `relay`) and a ping crosses.
pub fn rally_pair(
    control: &Control,
    a: &Host,
    b: &Host,
    party: &str,
    route: &str,
) -> Result<(Agent, Agent)> {
    rally_pair_with(control, [a, b], party, route, |_| Vec::new())
}

/// Like [`rally_pair`], with more `rally up` flags for each host (`extra(host)`).
pub fn rally_pair_with(
    control: &Control,
    [a, b]: [&Host; 2],
    party: &str,
    route: &str,
    extra: impl Fn(&Host) -> Vec<String>,
) -> Result<(Agent, Agent)> {
    let start = |h: &Host| {
        let flags = extra(h);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Agent::start_with(h, &format!("{}-agent", h.name()), control.target(), &flags)
    };
    let aa = start(a)?;
    let ab = start(b)?;
    aa.wait_control_connected(READY)?;
    ab.wait_control_connected(READY)?;
    let code = aa.party_create(party, &[])?;
    let out = ab.party_join(&code)?;
    crate::host::check_success(&out, "rally party join")?;
    let b_vip = ab.virtual_ip()?.to_string();
    let peer = ab.name().to_owned();
    wait_until(
        &format!("{} to reach {peer} on a {route} path", aa.name()),
        Duration::from_secs(40),
        Duration::from_millis(250),
        || {
            let strategy = strategy(&aa, &peer)?;
            if strategy != route {
                return Ok(false);
            }
            Ok(aa.kernel_ping(&b_vip, 1)?.status.success())
        },
    )
    .map_err(|e| crate::with_logs(e, &a.logs_tail()))?;
    Ok((aa, ab))
}

/// The `strategy` of peer `name` in `a`'s `rally peers --json` (`direct`, `relay`, `none`).
pub fn strategy(a: &Agent, name: &str) -> Result<String> {
    let peers = a.peers()?;
    let p = peers
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| anyhow!("{} does not list {name} yet", a.name()))?;
    Ok(p.strategy.clone().unwrap_or_else(|| "none".into()))
}

/// The pid of an agent's daemon (`ip netns exec` execs it, so it is the spawned pid).
pub fn agent_pid(agent: &Agent) -> Result<u32> {
    let dir = agent.state_dir().to_string_lossy().into_owned();
    tools::find_pid(&[dir.as_str(), " up "])
}

/// Starts a one-off `iperf3 -s -1` on `host` (it exits after one test) and waits until it
/// listens.
pub fn start_iperf_server(host: &Host) -> Result<Proc> {
    let iperf = tools::path(Tool::Iperf3)?.to_string_lossy().into_owned();
    let port = IPERF_PORT.to_string();
    let proc = host.spawn(
        &[iperf.as_str(), "-s", "-1", "-p", port.as_str()],
        host.log_path("iperf3-server"),
    )?;
    let filter = format!("sport = :{IPERF_PORT}");
    wait_until("iperf3 -s to listen", READY, POLL, || {
        let out = host.run_ok(&["ss", "-H", "-t", "-l", "-n", filter.as_str()])?;
        Ok(!out.trim().is_empty())
    })?;
    Ok(proc)
}

/// The UAPI socket of a userspace WireGuard interface.
fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from("/var/run/wireguard").join(format!("{ifname}.sock"))
}

/// A userspace WireGuard daemon (`subject` is boringtun-cli or wireguard-go) on each of `a` and
/// `b`, interfaces `10.99.<net>.1/24` and `.2`, UDP port `port` on both, configured with `wg`.
fn wireguard_pair(
    lab: &Lab,
    subject: Subject,
    a: &Host,
    b: &Host,
    net: u8,
    port: u16,
) -> Result<Path> {
    let tag = match subject {
        Subject::Boringtun => "bt",
        Subject::WireguardGo => "wg",
        _ => bail!("{} is not a reference WireGuard", subject.label()),
    };
    let keys = [tools::wg_keypair()?, tools::wg_keypair()?];
    let hosts = [a, b];
    let mut pids = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        // Interface names are global to the UAPI directory: keep them unique per process.
        let ifname = ifname(tag, i);
        let proc = start_wireguard(host, subject, &ifname)?;
        pids.push(proc.pid());
        let key_file = write_key(lab, &ifname, &keys[i].0)?;
        let other = hosts[1 - i];
        let port_s = port.to_string();
        let allowed = format!("10.99.{net}.{}/32", 2 - i);
        let endpoint = format!("{}:{port}", other.ip());
        let wg = tools::path(Tool::Wg)?.to_string_lossy().into_owned();
        host.run_ok(&[
            wg.as_str(),
            "set",
            ifname.as_str(),
            "listen-port",
            port_s.as_str(),
            "private-key",
            key_file.to_string_lossy().as_ref(),
            "peer",
            keys[1 - i].1.as_str(),
            "allowed-ips",
            allowed.as_str(),
            "endpoint",
            endpoint.as_str(),
        ])?;
        let addr = format!("10.99.{net}.{}/24", i + 1);
        host.run_ok(&["ip", "addr", "add", addr.as_str(), "dev", ifname.as_str()])?;
        host.run_ok(&["ip", "link", "set", ifname.as_str(), "mtu", TUN_MTU, "up"])?;
    }
    let target: Ipv4Addr = format!("10.99.{net}.2").parse()?;
    let t = target.to_string();
    wait_until(
        &format!("a ping through {}", subject.label()),
        READY,
        Duration::from_millis(200),
        || {
            Ok(a.run(&["ping", "-c", "1", "-W", "1", t.as_str()])?
                .status
                .success())
        },
    )
    .map_err(|e| crate::with_logs(e, &a.logs_tail()))?;
    Ok(Path {
        subject,
        client: a.clone(),
        server: b.clone(),
        target,
        pids,
    })
}

/// Starts a userspace WireGuard daemon (`subject`: boringtun-cli or wireguard-go) on `host`
/// with TUN interface `ifname` (unique on the machine: the UAPI directory is shared) and waits
/// until its UAPI socket is there; configure it with `wg set`.
pub fn start_wireguard(host: &Host, subject: Subject, ifname: &str) -> Result<Proc> {
    let (tag, tool) = match subject {
        Subject::Boringtun => ("bt", Tool::BoringtunCli),
        Subject::WireguardGo => ("wg", Tool::WireguardGo),
        _ => bail!("{} is not a reference WireGuard", subject.label()),
    };
    let bin = tools::path(tool)?.to_string_lossy().into_owned();
    let _ = std::fs::remove_file(uapi_socket(ifname));
    let mut args = vec![bin];
    match subject {
        Subject::Boringtun => args.extend(
            ["--foreground", "--disable-drop-privileges"]
                .iter()
                .map(|s| s.to_string()),
        ),
        _ => args.push("-f".into()),
    }
    args.push(ifname.to_owned());
    let proc = host.spawn(&args, host.log_path(&format!("{tag}-{ifname}")))?;
    let sock = uapi_socket(ifname);
    wait_until(
        &format!("{} to open {}", subject.label(), sock.display()),
        READY,
        POLL,
        || {
            if let Some(status) = proc.try_status()? {
                return Err(anyhow!("{} exited ({status})", proc.label()).context(crate::Abort));
            }
            Ok(sock.exists())
        },
    )
    .map_err(|e| crate::with_logs(e, &host.logs_tail()))?;
    Ok(proc)
}

/// `rb<tag><side><pid mod 1000>`: at most 15 characters, unique per process.
fn ifname(tag: &str, side: usize) -> String {
    format!(
        "rb{tag}{}{}",
        ["a", "b"][side],
        std::process::id() % 100_000
    )
}

/// Writes a WireGuard private key to a 0600 file in the lab's directory.
pub fn write_key(lab: &Lab, name: &str, key: &str) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = lab.dir().join("wg-keys");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    use std::io::Write;
    writeln!(f, "{key}")?;
    Ok(path)
}
