//! Processes: commands run to completion with a timeout, and long-running processes tracked so
//! that a lab's teardown can end every one of them.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::interrupted;

/// How often waits poll a child for its exit.
const POLL: Duration = Duration::from_millis(20);

/// Runs `cmd` with stdin closed, capturing stdout and stderr. Kills it and fails if it has not
/// exited after `timeout`. Not cut short by Ctrl-C: teardown uses it.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<Output> {
    run(cmd, timeout, false)
}

/// `run_with_timeout`, but also killed (with an error) when the lab is interrupted by Ctrl-C.
pub fn run_interruptible(cmd: Command, timeout: Duration) -> Result<Output> {
    run(cmd, timeout, true)
}

/// See `run_with_timeout`; `interruptible` makes it give up on Ctrl-C.
fn run(mut cmd: Command, timeout: Duration, interruptible: bool) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let stdout = reader_thread(child.stdout.take());
    let stderr = reader_thread(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {shown}"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline || (interruptible && interrupted()) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(POLL);
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None if interruptible && interrupted() => bail!("interrupted while running {shown}"),
        None => bail!(
            "{shown} did not finish within {:.1}s and was killed\nstdout: {}\nstderr: {}",
            timeout.as_secs_f64(),
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn reader_thread<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// One tracked child process.
struct Entry {
    id: u64,
    child: Child,
    status: Option<ExitStatus>,
}

impl Entry {
    /// Reaps the child if it has exited; returns its status once it has.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends `sig` unless the child has already exited (and so may have lost its pid).
    fn signal(&mut self, sig: libc::c_int) {
        if self.poll().is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
            unsafe {
                libc::kill(self.child.id() as i32, sig);
            }
        }
    }
}

/// Every process a lab has started. Only this registry reaps them, so a pid it signals is
/// always still its own child.
#[derive(Default)]
pub struct Procs {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

impl Procs {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `child`; returns its registry id.
    fn register(&self, child: Child) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.lock().push(Entry {
            id,
            child,
            status: None,
        });
        id
    }

    /// Runs `f` on the entry with `id`.
    fn with<T>(&self, id: u64, f: impl FnOnce(&mut Entry) -> T) -> Result<T> {
        let mut entries = self.lock();
        let entry = entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or_else(|| anyhow!("process #{id} is not tracked"))?;
        Ok(f(entry))
    }

    /// Ends every tracked process: SIGTERM, up to `grace` to exit, then SIGKILL; reaps them all.
    pub fn kill_all(&self, grace: Duration) {
        let mut entries = self.lock();
        entries.iter_mut().for_each(|e| e.signal(libc::SIGTERM));
        let deadline = Instant::now() + grace;
        while entries.iter_mut().any(|e| e.poll().is_none()) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        for entry in entries.iter_mut().filter(|e| e.status.is_none()) {
            entry.signal(libc::SIGKILL);
            entry.status = entry.child.wait().ok();
        }
    }
}

/// A handle on a long-running process started by a lab host. Cloning it does not copy the
/// process; dropping it does not stop the process (the lab's teardown does).
#[derive(Clone)]
pub struct Proc {
    id: u64,
    pid: u32,
    label: String,
    log: PathBuf,
    procs: Arc<Procs>,
}

impl Proc {
    /// Tracks `child` (already spawned, its output going to `log`) in `procs`.
    pub(crate) fn track(procs: &Arc<Procs>, child: Child, label: String, log: PathBuf) -> Self {
        let pid = child.id();
        let id = procs.register(child);
        Proc {
            id,
            pid,
            label,
            log,
            procs: Arc::clone(procs),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A short description (host and program).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The file holding its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its exit status if it has exited (reaping it), else `None`.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        self.procs.with(self.id, Entry::poll)
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Sends signal `sig` if it is still running.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        self.procs.with(self.id, |e| e.signal(sig))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the exit status.
    pub fn terminate(&self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(5))?
            .ok_or_else(|| anyhow!("{} (pid {}) survived SIGKILL", self.label, self.pid))
    }

    /// The log's text so far.
    pub fn log_text(&self) -> Result<String> {
        std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))
    }
}

/// The last `lines` lines of the file at `path` (reading at most its last 256 KiB).
pub fn tail_lines(path: &Path, lines: usize) -> Result<String> {
    const MAX: u64 = 256 * 1024;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(last_lines(&String::from_utf8_lossy(&buf), lines))
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\nb", 5), "a\nb");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn run_with_timeout_captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_with_timeout(cmd, Duration::from_secs(10)).expect("sh runs");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }

    #[test]
    fn run_with_timeout_kills_a_hung_command() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run_with_timeout(cmd, Duration::from_millis(300)).expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    }

    #[test]
    fn kill_all_ends_tracked_processes() {
        let procs = Arc::new(Procs::default());
        let child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let p = Proc::track(&procs, child, "sleep".into(), PathBuf::from("/dev/null"));
        assert!(p.is_running());
        procs.kill_all(Duration::from_secs(2));
        assert!(!p.is_running());
    }
}
