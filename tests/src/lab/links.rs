//! The emulated uplinks (delay, loss, far sites, statistics) and cutting the internet between
//! two sites.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::Site;
use crate::netns;
use crate::wan::{Link, WanProfile, WanStats};

use super::{Lab, NFT_HINT};

/// Name of the nftables table (in the internet namespace) that implements `Lab::cut`.
pub(super) const CUT_TABLE: &str = "rally_lab";

impl Lab {
    /// Sets the delay and loss of the uplink carrying `site`'s traffic (a WAN host's own, a
    /// router's, or for a host behind a router, that router's), in both directions. Applies
    /// to frames arriving from now on; frames already held keep their due time.
    pub fn set_wan(&self, site: &impl Site, profile: WanProfile) -> Result<()> {
        self.with_link(site, |link| link.set(profile))
    }

    /// Makes the uplink carrying `site`'s traffic far from `others`: frames between it and
    /// their public addresses get `extra` more delay each way, on top of the profile (so
    /// `site` can be near one agent and far from another); an empty `others` ends it. The
    /// other frames are not held back by these.
    pub fn set_wan_far(
        &self,
        site: &impl Site,
        others: &[&dyn Site],
        extra: Duration,
    ) -> Result<()> {
        let ips: Vec<_> = others.iter().map(|o| o.public_ip()).collect();
        self.with_link(site, |link| link.set_far(&ips, extra))
    }

    /// The current profile of the uplink carrying `site`'s traffic.
    pub fn wan(&self, site: &impl Site) -> Result<WanProfile> {
        self.with_link(site, |link| Ok(link.profile()))
    }

    /// Frame counts of the uplink carrying `site`'s traffic since it was made.
    pub fn wan_stats(&self, site: &impl Site) -> Result<WanStats> {
        self.with_link(site, |link| Ok(link.stats()))
    }

    /// Drops all traffic between `a`'s and `b`'s public addresses, both ways, on the internet
    /// bridge (nftables, bridge family, in the internet namespace), until `restore`.
    pub fn cut(&self, a: &impl Site, b: &impl Site) -> Result<()> {
        let elements = cut_elements(a, b)?;
        let mut topo = self.topo();
        if !topo.cut_table {
            let file = self.write_file("nft", "cut.nft", &cut_ruleset())?;
            netns::exec(&self.inet, &["nft", "-f", &file.to_string_lossy()])
                .with_context(|| format!("loading the cut table ({NFT_HINT})"))?;
            topo.cut_table = true;
        }
        netns::exec(
            &self.inet,
            &[
                "nft", "add", "element", "bridge", CUT_TABLE, "cut", &elements,
            ],
        )
        .with_context(|| format!("cutting {} from {}", a.site_name(), b.site_name()))?;
        Ok(())
    }

    /// Undoes `cut(a, b)`. Fails if the two were not cut.
    pub fn restore(&self, a: &impl Site, b: &impl Site) -> Result<()> {
        let elements = cut_elements(a, b)?;
        let topo = self.topo();
        if !topo.cut_table {
            bail!("{} and {} were not cut", a.site_name(), b.site_name());
        }
        netns::exec(
            &self.inet,
            &[
                "nft", "delete", "element", "bridge", CUT_TABLE, "cut", &elements,
            ],
        )
        .with_context(|| format!("restoring {} to {}", a.site_name(), b.site_name()))?;
        Ok(())
    }

    /// Runs `f` on the emulator of the uplink carrying `site`'s traffic.
    fn with_link<T>(&self, site: &impl Site, f: impl FnOnce(&Link) -> Result<T>) -> Result<T> {
        let Some(uplink) = site.uplink() else {
            bail!(
                "{} has no emulated uplink: it was added with add_host (use add_wan_host)",
                site.site_name()
            );
        };
        let topo = self.topo();
        let link = topo
            .links
            .get(uplink)
            .ok_or_else(|| anyhow!("no WAN emulator for uplink {uplink} in this lab"))?;
        f(link)
    }
}

/// The bridge-family table that drops frames between cut pairs of public addresses.
pub(super) fn cut_ruleset() -> String {
    format!(
        r#"table bridge {CUT_TABLE} {{
    set cut {{ type ipv4_addr . ipv4_addr; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ether type ip ip saddr . ip daddr @cut drop
    }}
}}
"#
    )
}

/// `{ A . B, B . A }` for `nft add/delete element`.
pub(super) fn cut_elements(a: &impl Site, b: &impl Site) -> Result<String> {
    let (x, y) = (a.public_ip(), b.public_ip());
    if x == y {
        bail!(
            "{} and {} share the public address {x}: nothing to cut between them",
            a.site_name(),
            b.site_name()
        );
    }
    Ok(format!("{{ {x} . {y}, {y} . {x} }}"))
}
