//! The control plane under a crowd: N synthetic agents (real QUIC clients: the agent's own
//! control client, `rally_agent::control`) register and join one party at once, N = 100 and
//! 1000. Each keeps its peer map as the real agent does (`rally_proto::PeerView`: a full map,
//! then deltas). Measured: time until every agent holds the full peer map, and the control plane's
//! peak memory (VmHWM). A real `rally up` agent created the party, so the same runs give an
//! agent's memory per peer (its VmRSS before and after the crowd joined, divided by N).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rally_agent::control::{self, ControlEvent, ControlHandle, Registration};
use rally_agent::state::ControlTarget;
use rally_proto::{DeltaError, Identity, Key32, PeerView, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::relay::random32;
use super::stats::Figure;
use super::tools;
use super::tunnels::{agent_pid, control_init, serve_control, Control};
use super::Options;
use crate::{bins, Agent, Host, Lab};

/// Crowd sizes measured.
pub const CROWDS: [usize; 2] = [100, 1000];

/// The generator's arguments (the hidden `bench-control-load` subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub control: String,
    #[arg(long)]
    pub key: String,
    #[arg(long)]
    pub n: usize,
    /// Join this party (else the first synthetic agent creates one).
    #[arg(long)]
    pub code: Option<String>,
    /// Party members besides the synthetic agents.
    #[arg(long, default_value_t = 0)]
    pub extra: usize,
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Stay connected this long after printing the result.
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
}

/// The generator's result (one JSON line on stdout).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadResult {
    pub n: usize,
    /// From starting every client until all are registered.
    pub registered_ms: f64,
    /// From sending every join until all are answered.
    pub joined_ms: f64,
    /// From starting every client until every one holds the full peer map (`None`: not all
    /// did within the timeout).
    pub converged_ms: Option<f64>,
    /// From sending every join until every agent holds the full peer map (`None`: not all did
    /// within the timeout): the control plane's part, without the QUIC handshakes.
    #[serde(default)]
    pub converged_after_joins_ms: Option<f64>,
    /// How many agents held the full peer map when the wait ended.
    pub converged: usize,
    /// Peer entries received by all agents together (full maps and deltas): N·(N−1) at best.
    #[serde(default)]
    pub entries: usize,
    /// Peer-map messages (full maps and deltas) received by all agents together.
    #[serde(default)]
    pub messages: usize,
    pub join_errors: usize,
    /// The distinct join errors (at most a few), with counts.
    #[serde(default)]
    pub errors: Vec<(String, usize)>,
}

/// Per-agent progress, written by the agents' event tasks.
#[derive(Default)]
struct Progress {
    registered: AtomicUsize,
    converged: AtomicUsize,
    entries: AtomicUsize,
    messages: AtomicUsize,
}

/// Runs the crowd and prints a [`LoadResult`].
pub fn load(args: &LoadArgs) -> Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(crowd(args))?;
    println!("{}", serde_json::to_string(&result)?);
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    // Dropping the runtime closes every connection.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// One QUIC connection per client: more than the default 1024 descriptors for 1000 agents.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn crowd(args: &LoadArgs) -> Result<LoadResult> {
    let target = ControlTarget {
        addr: args.control.clone(),
        key: args.key.parse::<Key32>().map_err(|e| anyhow!("{e}"))?,
    };
    let progress = Arc::new(Progress::default());
    // Peers each agent must see; known once the party exists.
    let expected = Arc::new(AtomicUsize::new(usize::MAX));
    let start = Instant::now();
    let handles: Vec<ControlHandle> = (0..args.n)
        .map(|i| spawn_synthetic(i, &target, &progress, &expected))
        .collect();
    let deadline = start + Duration::from_secs(args.timeout_secs);
    wait(&deadline, || {
        progress.registered.load(Ordering::SeqCst) >= args.n
    })
    .await;
    let registered_ms = start.elapsed().as_secs_f64() * 1000.0;
    if progress.registered.load(Ordering::SeqCst) < args.n {
        bail!(
            "only {}/{} agents registered within {}s",
            progress.registered.load(Ordering::SeqCst),
            args.n,
            args.timeout_secs
        );
    }
    let (code, joiners) = party_to_join(args, &handles).await?;
    expected.store(args.n - 1 + args.extra, Ordering::SeqCst);
    let join_start = Instant::now();
    let (join_errors, errors) = join_all(joiners, &code).await;
    let joined_ms = join_start.elapsed().as_secs_f64() * 1000.0;
    wait(&deadline, || {
        progress.converged.load(Ordering::SeqCst) >= args.n
    })
    .await;
    let converged = progress.converged.load(Ordering::SeqCst);
    Ok(LoadResult {
        n: args.n,
        registered_ms,
        joined_ms,
        converged_ms: (converged >= args.n).then(|| start.elapsed().as_secs_f64() * 1000.0),
        converged_after_joins_ms: (converged >= args.n)
            .then(|| join_start.elapsed().as_secs_f64() * 1000.0),
        converged,
        entries: progress.entries.load(Ordering::Relaxed),
        messages: progress.messages.load(Ordering::Relaxed),
        join_errors,
        errors,
    })
}

/// Starts synthetic agent `i`'s control client, and a task that keeps its peer map and
/// counts its progress (converged once it holds `expected` peers).
fn spawn_synthetic(
    i: usize,
    target: &ControlTarget,
    progress: &Arc<Progress>,
    expected: &Arc<AtomicUsize>,
) -> ControlHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reg = Registration {
        identity: Arc::new(Identity::from_seed(random32())),
        wg_key: Key32(random32()),
        name: format!("syn{i}"),
        endpoints: Vec::new(),
        proxy: None,
    };
    let handle = control::spawn(target.clone(), reg, tx);
    let resync = handle.clone();
    let progress = progress.clone();
    let expected = expected.clone();
    tokio::spawn(async move {
        let mut done = false;
        let mut view = PeerView::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                ControlEvent::Registered { .. } => {
                    progress.registered.fetch_add(1, Ordering::SeqCst);
                }
                ControlEvent::PeerMap { version, peers } => {
                    progress.messages.fetch_add(1, Ordering::Relaxed);
                    progress.entries.fetch_add(peers.len(), Ordering::Relaxed);
                    view.handle_full(version, peers);
                }
                ControlEvent::PeerDelta { version, changes } => {
                    progress.messages.fetch_add(1, Ordering::Relaxed);
                    progress.entries.fetch_add(changes.len(), Ordering::Relaxed);
                    if let Err(DeltaError::Gap { .. }) = view.handle_delta(version, changes) {
                        resync.sync_peers();
                    }
                }
                _ => {}
            }
            if !done && view.len() >= expected.load(Ordering::SeqCst) {
                done = true;
                progress.converged.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    handle
}

/// The invite code to join and who joins: `--code` and every agent, or a party the first
/// agent creates and the others.
async fn party_to_join<'h>(
    args: &LoadArgs,
    handles: &'h [ControlHandle],
) -> Result<(String, &'h [ControlHandle])> {
    match &args.code {
        Some(c) => Ok((c.clone(), handles)),
        None => {
            let r = handles[0]
                .request(Request::CreateParty {
                    name: "crowd".into(),
                    max_uses: None,
                    expires_in_secs: None,
                })
                .await
                .map_err(|e| anyhow!("creating the party: {e}"))?;
            let Response::PartyCreated { invite, .. } = r else {
                bail!("unexpected answer to CreateParty: {r:?}");
            };
            Ok((invite, &handles[1..]))
        }
    }
}

/// Sends every join at once and waits for the answers; returns how many failed and the
/// distinct errors (at most five), with counts.
async fn join_all(joiners: &[ControlHandle], code: &str) -> (usize, Vec<(String, usize)>) {
    let errors: Arc<Mutex<Vec<(String, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::new();
    for h in joiners {
        let (h, code, errors, failed) =
            (h.clone(), code.to_owned(), errors.clone(), failed.clone());
        joins.push(tokio::spawn(async move {
            if let Err(e) = h.request(Request::JoinParty { code }).await {
                failed.fetch_add(1, Ordering::SeqCst);
                let e = e.to_string();
                let mut errors = errors.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = errors.iter().position(|(m, _)| *m == e) {
                    errors[i].1 += 1;
                } else if errors.len() < 5 {
                    errors.push((e, 1));
                }
            }
        }));
    }
    for j in joins {
        let _ = j.await;
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (failed.load(Ordering::SeqCst), errors)
}

async fn wait(deadline: &Instant, done: impl Fn() -> bool) {
    while !done() && Instant::now() < *deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The driver: for each crowd size and run, a fresh control plane and a fresh real agent.
pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let hosts = Hosts {
        control: lab.add_host("control")?,
        gen: lab.add_host("gen")?,
        agent: lab.add_host("agent")?,
        lab_bin: bins::rally_lab()?.to_string_lossy().into_owned(),
    };
    let mut figures = Vec::new();
    for n in CROWDS {
        let mut series = Series::default();
        for run in 1..=opts.runs {
            crowd_run(lab, &hosts, n, (run, opts.runs), &mut series)?;
        }
        figures.extend(crowd_figures(n, series));
    }
    Ok(figures)
}

/// The hosts every run uses, and the `rally-lab` binary the generator runs.
struct Hosts {
    control: Host,
    gen: Host,
    agent: Host,
    lab_bin: String,
}

/// One crowd size's measurements, one entry per run.
#[derive(Default)]
struct Series {
    /// Start → every synthetic agent holds the full map (ms).
    converged: Vec<f64>,
    /// First join → every synthetic agent holds the full map (ms).
    converged_after_joins: Vec<f64>,
    /// Start → all registered (ms).
    registered: Vec<f64>,
    /// All joins answered (ms).
    joined: Vec<f64>,
    /// The control plane's VmHWM (MiB).
    control_hwm_mib: Vec<f64>,
    /// The real agent's RSS growth per peer it holds (KiB).
    agent_kib_per_peer: Vec<f64>,
    /// The real agent's RSS before the crowd (KiB).
    agent_base_rss_kib: Vec<f64>,
    /// What went wrong in a run, for the figures' notes.
    notes: Vec<String>,
}

/// Run `run` of `runs` with a crowd of `n`: a fresh control plane and real agent (which
/// creates the party), the generator's crowd joining it; appends to `series`.
fn crowd_run(
    lab: &Lab,
    hosts: &Hosts,
    n: usize,
    (run, runs): (usize, usize),
    series: &mut Series,
) -> Result<()> {
    let tag = format!("n{n}r{run}");
    let control = start_control(lab, &hosts.control, &tag)?;
    let mut agent = Agent::start(&hosts.agent, &format!("m{tag}"), control.target())?;
    agent.wait_control_connected(Duration::from_secs(30))?;
    let code = agent.party_create("crowd", &[])?;
    let pid = agent_pid(&agent)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = tools::status_kib(pid, "VmRSS")? as f64;
    let crowd = start_crowd(hosts, &control, &code, n, &tag)?;
    let result = wait_result(&crowd, Duration::from_secs(150))?;
    // The real agent's view: every synthetic agent listed, then settled.
    let listed = crate::wait_until(
        &format!("agent to list {n} peers"),
        Duration::from_secs(25),
        Duration::from_millis(500),
        || Ok(agent.peers()?.len() >= n),
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = tools::status_kib(pid, "VmRSS")? as f64;
    let peak = tools::status_kib(control.proc.pid(), "VmHWM")? as f64;
    print_run(n, (run, runs), &result, peak, (rss0, rss1));
    series
        .converged
        .push(result.converged_ms.unwrap_or(f64::NAN));
    series
        .converged_after_joins
        .push(result.converged_after_joins_ms.unwrap_or(f64::NAN));
    series.registered.push(result.registered_ms);
    series.joined.push(result.joined_ms);
    series.control_hwm_mib.push(peak / 1024.0);
    series.agent_base_rss_kib.push(rss0);
    // Per peer the agent actually holds (all N unless the crowd did not converge).
    let held = agent.peers().map_or(0, |p| p.len());
    if held > 0 {
        series.agent_kib_per_peer.push((rss1 - rss0) / held as f64);
    } else {
        series.agent_kib_per_peer.push(f64::NAN);
    }
    if listed.is_err() {
        series
            .notes
            .push(format!("run {run}: the agent held {held} of {n} peers"));
    }
    if result.converged < n {
        series.notes.push(format!(
            "run {run}: {}/{n} converged within 90 s",
            result.converged
        ));
    }
    for (e, k) in &result.errors {
        series
            .notes
            .push(format!("run {run}: {k} joins failed: {e}"));
    }
    let _ = crowd.terminate(Duration::from_secs(2));
    let _ = agent.stop();
    control.proc.terminate(Duration::from_secs(5))?;
    Ok(())
}

/// A fresh control plane (run `tag`) on `host`, without the per-address limits: the crowd
/// comes from one host.
fn start_control(lab: &Lab, host: &Host, tag: &str) -> Result<Control> {
    let key = control_init(lab, host, tag)?;
    serve_control(
        lab,
        host,
        tag,
        key,
        &[],
        // A crowd from one host: no per-address limits on joins, new identities
        // or connections.
        &[
            "--join-burst",
            "1000000",
            "--join-refill-secs",
            "1",
            "--open-registration",
            "--max-connections-per-ip",
            "10000",
        ],
    )
}

/// Starts the generator (`rally-lab bench-control-load`): a crowd of `n` joining `code`.
fn start_crowd(
    hosts: &Hosts,
    control: &Control,
    code: &str,
    n: usize,
    tag: &str,
) -> Result<crate::Proc> {
    let n_s = n.to_string();
    let key_arg = format!("--key={}", control.key);
    let log = hosts.gen.log_path(&format!("control-load-{tag}"));
    hosts.gen.spawn(
        &[
            hosts.lab_bin.as_str(),
            "bench-control-load",
            "--control",
            control.addr.as_str(),
            // `--key=KEY`: a key may start with '-'.
            key_arg.as_str(),
            "--n",
            n_s.as_str(),
            "--code",
            code,
            "--extra",
            "1",
            "--timeout-secs",
            "90",
            "--hold-secs",
            "30",
        ],
        &log,
    )
}

/// The progress line of one run.
fn print_run(
    n: usize,
    (run, runs): (usize, usize),
    result: &LoadResult,
    control_hwm_kib: f64,
    (rss0, rss1): (f64, f64),
) {
    println!(
        "    N={n} run {run}/{runs}: registered {:.0} ms, joins answered {:.0} ms, \
         converged {} ms ({} ms after the joins began; {}/{n}; {} messages, {} peer \
         entries), join errors {:?}, control VmHWM {:.1} MiB, agent RSS {:.1} → {:.1} MiB",
        result.registered_ms,
        result.joined_ms,
        result
            .converged_ms
            .map_or("-".into(), |v| format!("{v:.0}")),
        result
            .converged_after_joins_ms
            .map_or("-".into(), |v| format!("{v:.0}")),
        result.converged,
        result.messages,
        result.entries,
        result.errors,
        control_hwm_kib / 1024.0,
        rss0 / 1024.0,
        rss1 / 1024.0
    );
}

/// One crowd size's figures.
fn crowd_figures(n: usize, series: Series) -> Vec<Figure> {
    let Series {
        converged: conv,
        converged_after_joins: conv_joins,
        registered: reg,
        joined,
        control_hwm_mib: hwm,
        agent_kib_per_peer: per_peer,
        agent_base_rss_kib: base_rss,
        notes,
    } = series;
    let note = |f: Figure| {
        if notes.is_empty() {
            f
        } else {
            let text = notes.join("; ");
            f.with_note(text)
        }
    };
    let mut figures = Vec::new();
    let mut f = Figure::new(
        "control",
        &format!("{n} agents register + join → all hold full peer map"),
        "rally-control",
        "ms",
        conv,
    );
    f.ratio_to("registration alone", &reg);
    figures.push(note(f));
    figures.push(Figure::new(
        "control",
        &format!("{n} agents: from the joins until all hold the full peer map"),
        "rally-control",
        "ms",
        conv_joins,
    ));
    figures.push(Figure::new(
        "control",
        &format!("{n} agents: registration alone (baseline)"),
        "rally-control",
        "ms",
        reg,
    ));
    figures.push(Figure::new(
        "control",
        &format!("{n} agents: all joins answered"),
        "rally-control",
        "ms",
        joined,
    ));
    figures.push(Figure::new(
        "control",
        &format!("{n} agents: peak memory (VmHWM)"),
        "rally-control",
        "MiB",
        hwm,
    ));
    let mut f = Figure::new(
        "agent",
        &format!("memory per peer ({n} idle peers)"),
        "rally agent",
        "KiB",
        per_peer,
    );
    let base: Vec<f64> = base_rss.iter().map(|k| k / n as f64).collect();
    f.ratio_to("agent's own RSS / N", &base);
    figures.push(f);
    figures
}

/// Waits for the generator's JSON line in its log.
fn wait_result(proc: &crate::Proc, limit: Duration) -> Result<LoadResult> {
    let deadline = Instant::now() + limit;
    loop {
        let log = proc.log_text()?;
        if let Some(line) = log.lines().find(|l| l.starts_with('{')) {
            return serde_json::from_str(line).context("reading the generator's result");
        }
        if !proc.is_running() || Instant::now() >= deadline || crate::interrupted() {
            bail!(
                "the control load generator gave no result:\n{}",
                crate::procs::last_lines(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
