//! Pinning the forwarder under test and the generator to separate CPUs, and steering the
//! receivers' softirq work with RPS.

use anyhow::{bail, Context, Result};

use crate::Lab;

/// Where the pinned passes put the forwarder under test and the generator.
pub(super) struct Pinning {
    /// The forwarder's CPU (the last one), for `taskset -c`.
    forwarder: String,
    /// Every other CPU, for `taskset -c`.
    pub(super) generator: String,
    /// The same CPUs as an `rps_cpus` hex mask.
    generator_mask: String,
    /// Every CPU, to undo the pinning.
    all: String,
}

impl Pinning {
    /// `None` on a one-CPU machine.
    pub(super) fn plan() -> Option<Pinning> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n < 2 {
            return None;
        }
        let mask: u128 = (1u128 << (n - 1).min(127)) - 1;
        Some(Pinning {
            forwarder: (n - 1).to_string(),
            generator: format!("0-{}", n - 2),
            generator_mask: format!("{mask:x}"),
            all: format!("0-{}", n - 1),
        })
    }

    /// Pins every thread of `pid` to the forwarder's CPU.
    pub(super) fn pin(&self, pid: u32) -> Result<()> {
        taskset(pid, &self.forwarder)
    }

    /// Lets every thread of `pid` run anywhere again.
    pub(super) fn unpin(&self, pid: u32) -> Result<()> {
        taskset(pid, &self.all)
    }

    /// With `on`, steers what arrives on every bridge port of the internet namespace and on the
    /// generator's interface to the generator's CPUs (RPS); without, back to the default (no
    /// RPS: the softirq runs on the CPU that transmitted).
    pub(super) fn steer(&self, lab: &Lab, gen: &crate::Host, on: bool) -> Result<()> {
        let mask = if on {
            self.generator_mask.as_str()
        } else {
            "0"
        };
        let script = format!(
            "for q in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > $q || exit 1; done"
        );
        crate::netns::exec(lab.internet_ns(), &["sh", "-c", script.as_str()])
            .context("setting rps_cpus in the internet namespace")?;
        gen.run_ok(&["sh", "-c", script.as_str()])
            .context("setting rps_cpus on the generator host")?;
        Ok(())
    }
}

fn taskset(pid: u32, cpus: &str) -> Result<()> {
    let pid_s = pid.to_string();
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, pid_s.as_str()])
        .output()
        .context("running taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
