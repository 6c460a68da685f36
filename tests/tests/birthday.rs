//! Birthday punching in the lab: a home router and a symmetric NAT (`masquerade fully-random`)
//! go direct, attempt after attempt ([`rally_lab::bench::punch`], also `rally-lab bench punch
//! --attempts 20`). `RALLY_PUNCH_ATTEMPTS` sets the count (default 3); every attempt must go
//! direct and carry pings both ways.

use anyhow::{bail, Result};
use rally_lab::bench::punch;
use rally_lab::with_lab;

#[test]
fn a_home_router_and_a_symmetric_nat_go_direct() -> Result<()> {
    let attempts: usize = std::env::var("RALLY_PUNCH_ATTEMPTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    with_lab(|lab| {
        let s = punch::run(lab, attempts)?;
        println!("{}", s.line());
        if s.direct() != s.attempts.len() {
            bail!(
                "{} of {} attempts stayed relayed",
                s.attempts.len() - s.direct(),
                s.attempts.len()
            );
        }
        Ok(())
    })
}
