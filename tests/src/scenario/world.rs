//! The fixed parts of a scenario: a control plane and two relays ([`World`]) and a pair of
//! agents behind two home routers in one party ([`Pair`]).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::rally::{last_line, RelayServer};
use crate::{bins, wait_until, Agent, ControlPlane, Host, Lab, NatKind, Router};

use super::events::json_lines;
use super::view::{view, wait_view, View};
use super::{ms, CONTROL_TIMEOUT, VIEW_POLL};

/// A control plane and two relays (`r1`, `r2`), each on its own emulated WAN host
/// (`control`, `relay1`, `relay2`; 20 ms per uplink by default).
pub struct World {
    pub cp: ControlPlane,
    pub relays: Vec<RelayServer>,
}

impl World {
    /// Starts the control plane and both relays (the relays need the control key, the
    /// control plane the relays: `init` first, then the relays, then `serve`).
    pub fn start(lab: &Lab) -> Result<World> {
        let cp_host = lab.add_wan_host("control")?;
        let r1_host = lab.add_wan_host("relay1")?;
        let r2_host = lab.add_wan_host("relay2")?;
        let key = init_control(&cp_host, lab)?;
        let r1 = RelayServer::start(&r1_host, "r1", &key)?;
        let r2 = RelayServer::start(&r2_host, "r2", &key)?;
        let cp = ControlPlane::start_with_relays(&cp_host, lab, &[r1.spec(), r2.spec()])?;
        Ok(World {
            cp,
            relays: vec![r1, r2],
        })
    }

    /// The relay named `name` (`r1`, `r2`).
    pub fn relay(&self, name: &str) -> Result<&RelayServer> {
        self.relays
            .iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| anyhow!("no relay named {name:?}"))
    }

    /// The relay other than `name`.
    pub fn other_relay(&self, name: &str) -> Result<&RelayServer> {
        self.relays
            .iter()
            .find(|r| r.name() != name)
            .ok_or_else(|| anyhow!("no relay other than {name:?}"))
    }
}

/// `rally-control init` in the data directory `ControlPlane::start*` will use; returns the
/// control key (init keeps an existing key, so the later `serve` uses the same one).
pub fn init_control(host: &Host, lab: &Lab) -> Result<String> {
    let bin = bins::rally_control()?.to_string_lossy().into_owned();
    let dir = lab.dir().join(format!("control-{}", host.name()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.to_string_lossy().into_owned();
    let out = host.run_ok(&[bin.as_str(), "init", "--data-dir", d.as_str()])?;
    last_line(&out)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("rally-control init printed no key"))
}

/// Waits until the agent's netcheck has reported (a `nat_detected` event in its history), so
/// the control plane knows its public endpoint before a party forms. (Filters the history
/// itself rather than with `--type`, which scenario 6 tests.)
pub fn wait_netcheck(agent: &Agent, timeout: Duration) -> Result<()> {
    let what = format!("agent {} to finish netcheck", agent.name());
    wait_until(&what, timeout, Duration::from_millis(200), || {
        let out = agent.rally_ok(&["events", "--json"])?;
        Ok(json_lines(&out).iter().any(|e| e["type"] == "nat_detected"))
    })
}

/// Two agents, `a` and `b`, each alone behind its own home router, in one party: the direct
/// path exists, and both relays are standbys.
pub struct Pair {
    pub router_a: Router,
    pub router_b: Router,
    pub a: Agent,
    pub b: Agent,
    pub a_vip: String,
    pub b_vip: String,
}

impl Pair {
    /// Routers `<tag>-gwa` / `<tag>-gwb`, hosts and agents `<tag>a` / `<tag>b` started with
    /// `extra` flags (e.g. `--profile stable`), party `<tag>` created by `a` and joined by `b`.
    /// Returns once both list each other.
    pub fn start(lab: &Lab, world: &World, tag: &str, extra: &[&str]) -> Result<Pair> {
        Pair::start_behind(lab, world, tag, NatKind::HomeRouter, extra)
    }

    /// As [`Pair::start`], with both routers of `kind` (e.g. [`NatKind::Symmetric`]: the
    /// pair stays relayed).
    pub fn start_behind(
        lab: &Lab,
        world: &World,
        tag: &str,
        kind: NatKind,
        extra: &[&str],
    ) -> Result<Pair> {
        let router_a = lab.add_router(&format!("{tag}-gwa"), kind)?;
        let router_b = lab.add_router(&format!("{tag}-gwb"), kind)?;
        let (a_name, b_name) = (format!("{tag}a"), format!("{tag}b"));
        let a_host = lab.add_host_behind(&router_a, &a_name)?;
        let b_host = lab.add_host_behind(&router_b, &b_name)?;
        let a = Agent::start_with(&a_host, &a_name, world.cp.control(), extra)?;
        let b = Agent::start_with(&b_host, &b_name, world.cp.control(), extra)?;
        for agent in [&a, &b] {
            agent.wait_control_connected(CONTROL_TIMEOUT)?;
            wait_netcheck(agent, CONTROL_TIMEOUT)?;
        }
        let code = a.party_create(tag, &[])?;
        let out = b.party_join(&code)?;
        ensure!(
            out.status.success(),
            "{b_name} could not join party {tag}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        a.wait_for_peers(&[&b_name], CONTROL_TIMEOUT)?;
        b.wait_for_peers(&[&a_name], CONTROL_TIMEOUT)?;
        let a_vip = a.virtual_ip()?.to_string();
        let b_vip = b.virtual_ip()?.to_string();
        Ok(Pair {
            router_a,
            router_b,
            a,
            b,
            a_vip,
            b_vip,
        })
    }

    /// `a`'s view of `b`.
    pub fn a_view(&self) -> Result<View> {
        view(&self.a, self.b.name())
    }

    /// `b`'s view of `a`.
    pub fn b_view(&self) -> Result<View> {
        view(&self.b, self.a.name())
    }

    /// Waits until both agents' views of each other satisfy `pred`; returns the time it took
    /// and the two views (`a`'s, then `b`'s).
    pub fn wait_both(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&View) -> bool,
    ) -> Result<(Duration, View, View)> {
        let start = Instant::now();
        let mut last = None;
        let what = format!("{} and {} to {what}", self.a.name(), self.b.name());
        let check = || {
            let (va, vb) = (self.a_view()?, self.b_view()?);
            let ok = pred(&va) && pred(&vb);
            last = Some((va, vb));
            Ok(ok)
        };
        wait_until(&what, timeout, VIEW_POLL, check).map_err(|e| {
            let seen = last.as_ref().map_or("nothing".into(), |(va, vb)| {
                format!("a: {}, b: {}", va.describe(), vb.describe())
            });
            crate::with_logs(
                e.context(format!("last seen {seen}")),
                &self.a.host().logs_tail(),
            )
        })?;
        let (va, vb) = last.ok_or_else(|| anyhow!("no view"))?;
        Ok((start.elapsed(), va, vb))
    }

    /// Waits until `a` gets a kernel ping answered by `b` over the overlay; returns how long
    /// it took.
    pub fn wait_for_ping(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let out = self.a.kernel_ping(&self.b_vip, 1)?;
            if out.status.success() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no ping answered within {} ({})",
                    ms(timeout),
                    self.describe()
                );
            }
        }
    }

    /// Waits until `a`'s relay path `relay` is up and trusted again (up, `good_probes` good
    /// probes in a row, and its smoothed latency back under `latency_below_ms`), so relay
    /// switching may pick it.
    pub fn wait_relay_trusted(
        &self,
        relay: &str,
        good_probes: u32,
        latency_below_ms: f64,
        timeout: Duration,
    ) -> Result<()> {
        let path = format!("relay:{relay}");
        wait_view(
            &self.a,
            self.b.name(),
            &format!("trust {path} again"),
            timeout,
            |v| {
                v.path(&path).is_some_and(|p| {
                    p.health == "up"
                        && p.consecutive_successes >= good_probes
                        && p.latency_ms.is_some_and(|l| l < latency_below_ms)
                })
            },
        )?;
        Ok(())
    }

    /// A one-line summary of both views.
    pub fn describe(&self) -> String {
        let one = |v: Result<View>| v.map_or_else(|e| format!("({e:#})"), |v| v.describe());
        format!(
            "{}→{}: {}; {}→{}: {}",
            self.a.name(),
            self.b.name(),
            one(self.a_view()),
            self.b.name(),
            self.a.name(),
            one(self.b_view())
        )
    }
}
