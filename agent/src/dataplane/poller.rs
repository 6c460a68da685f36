//! The data-plane thread's wait: one `epoll` of its own over the UDP socket, the TUN device,
//! the discovery capture and a doorbell, until the earliest deadline of the timers table.
//!
//! The hot path (readiness → read → encrypt → send) runs without an async runtime between the
//! kernel and the engine: after 10 ms of idling, a wake-up through tokio's driver, its timer
//! wheel and a `select!` of seven futures ran from cold caches, some 20 µs per hop more than
//! boringtun's `epoll_wait` → `read` → `sendto` (docs/benchmarks.md). Everything else the
//! engine hears of comes through tokio channels (the daemon's commands, frames from relay
//! connections over TCP, datagrams from side sockets), whose tasks run on the data plane's
//! I/O thread ([`IoThread`]): the engine polls those channels with a waker that rings the
//! doorbell, an `eventfd` in the same `epoll`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Duration;

use tracing::debug;

/// An `eventfd` that wakes the data-plane thread's wait; as a waker, it is what tokio
/// channels wake when a message arrives.
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> io::Result<Arc<Doorbell>> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(Doorbell { fd }))
    }

    /// Makes the next (or a running) wait return.
    pub fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our own eventfd. A full counter
        // (EAGAIN) means a ring is pending anyway.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Takes the rings so far (the next wait sleeps again until a new one).
    pub fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from our own eventfd; EAGAIN
        // (nothing rang) is fine.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

impl Wake for Doorbell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

/// What became ready.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub udp: bool,
    pub tun: bool,
    pub capture: bool,
    pub bell: bool,
}

const UDP: u64 = 0;
const TUN: u64 = 1;
const CAPTURE: u64 = 2;
const BELL: u64 = 3;

/// A level-triggered `epoll` over the UDP socket, the TUN device, the discovery capture and its
/// own doorbell: what a turn leaves unread is reported again by the next wait.
pub struct Poller {
    ep: OwnedFd,
    bell: Arc<Doorbell>,
    udp: RawFd,
    /// Whether the socket is watched (not while the node holds it unread).
    udp_on: bool,
    capture: Option<RawFd>,
    /// Whether `epoll_pwait2` (nanosecond timeouts, Linux 5.11) works here; otherwise
    /// `epoll_wait` with the timeout rounded up to a millisecond.
    precise: bool,
}

/// How long a wait that failed unexpectedly pauses at most (the loop never spins on an error).
const ERROR_PAUSE: Duration = Duration::from_millis(10);

impl Poller {
    pub fn new(udp: RawFd, tun: RawFd) -> io::Result<Poller> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` was just opened and is owned by nothing else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let p = Poller {
            ep,
            bell: Doorbell::new()?,
            udp,
            udp_on: true,
            capture: None,
            precise: true,
        };
        p.ctl(libc::EPOLL_CTL_ADD, udp, UDP)?;
        p.ctl(libc::EPOLL_CTL_ADD, tun, TUN)?;
        p.ctl(libc::EPOLL_CTL_ADD, p.bell.fd.as_raw_fd(), BELL)?;
        Ok(p)
    }

    /// The doorbell, which channels polled with [`Self::waker`] ring.
    pub fn bell(&self) -> &Doorbell {
        &self.bell
    }

    /// A waker that rings the doorbell.
    pub fn waker(&self) -> Waker {
        Waker::from(self.bell.clone())
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: a valid epoll descriptor and event; `fd` is the caller's open descriptor.
        if unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches the socket or not (the node's hold), and the capture that is open now (it
    /// follows the default route, so its descriptor may change).
    fn update(&mut self, socket: bool, capture: Option<RawFd>) {
        if socket != self.udp_on {
            let op = if socket {
                libc::EPOLL_CTL_ADD
            } else {
                libc::EPOLL_CTL_DEL
            };
            match self.ctl(op, self.udp, UDP) {
                Ok(()) => self.udp_on = socket,
                Err(e) => debug!("data-plane wait, socket: {e}"),
            }
        }
        if capture != self.capture {
            if let Some(old) = self.capture.take() {
                // A closed descriptor left the set by itself; an error here says just that.
                let _ = self.ctl(libc::EPOLL_CTL_DEL, old, CAPTURE);
            }
            if let Some(fd) = capture {
                match self.ctl(libc::EPOLL_CTL_ADD, fd, CAPTURE) {
                    Ok(()) => self.capture = Some(fd),
                    Err(e) => debug!("data-plane wait, capture: {e}"),
                }
            }
        }
    }

    /// Waits up to `timeout` (zero: only looks) for something to be readable; the socket is
    /// left out unless `socket`. A signal ends the wait early with nothing ready.
    pub fn wait(&mut self, socket: bool, capture: Option<RawFd>, timeout: Duration) -> Ready {
        self.update(socket, capture);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        let mut ready = Ready::default();
        match self.epoll(&mut events, timeout) {
            Ok(n) => {
                for ev in &events[..n] {
                    match ev.u64 {
                        UDP => ready.udp = true,
                        TUN => ready.tun = true,
                        CAPTURE => ready.capture = true,
                        BELL => ready.bell = true,
                        _ => {}
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("data-plane wait: {e}");
                std::thread::sleep(timeout.min(ERROR_PAUSE));
            }
        }
        ready
    }

    /// One `epoll_pwait2`, or `epoll_wait` where that is missing (an older kernel) or refused (a
    /// seccomp filter that predates it); returns the events filled.
    fn epoll(&mut self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        if self.precise {
            let ts = libc::timespec {
                tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
                // Below 10⁹: fits every platform's `c_long`.
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `events` is a valid array of `max` entries and `ts` a valid timespec; no
            // signal mask.
            let n = unsafe {
                libc::epoll_pwait2(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    max,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
                return Err(e);
            }
            debug!("epoll_pwait2 unavailable ({e}): timeouts in whole milliseconds");
            self.precise = false;
        }
        // Rounded up: the loop never wakes before its deadline (and then waits again).
        let ms = timeout.as_nanos().div_ceil(1_000_000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        // SAFETY: `events` is a valid array of `max` entries.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The thread that runs the data plane's tokio tasks (relay connections over TLS/TCP, side
/// sockets' readers) on a runtime of its own, so that they neither wait for the engine's loop
/// nor wake it but through their channels. Stopped (its tasks dropped) when dropped.
pub struct IoThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    pub fn start() -> io::Result<IoThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rally-dp-io".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        Ok(IoThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The runtime the engine's thread enters, so its tasks and sockets belong to this thread.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Instant;

    /// A poller over a fresh socket pair's receiver (the TUN slot gets a second socket).
    fn poller() -> (Poller, UdpSocket, UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let p = Poller::new(rx.as_raw_fd(), other.as_raw_fd()).expect("epoll");
        (p, rx, other, tx)
    }

    #[test]
    fn a_ring_wakes_the_wait_until_cleared() {
        let (mut p, ..) = poller();
        assert_eq!(p.wait(true, None, Duration::ZERO), Ready::default());
        p.bell().ring();
        p.bell().ring();
        assert!(p.wait(true, None, Duration::from_secs(5)).bell);
        p.bell().clear();
        assert!(!p.wait(true, None, Duration::ZERO).bell);
    }

    #[test]
    fn a_channel_send_from_another_thread_rings_through_the_waker() {
        let (mut p, ..) = poller();
        let waker = p.waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        assert!(rx.poll_recv(&mut cx).is_pending());
        let sender = std::thread::spawn(move || tx.send(7));
        assert!(p.wait(true, None, Duration::from_secs(5)).bell);
        assert!(sender.join().expect("sender").is_ok());
        assert_eq!(rx.poll_recv(&mut cx), std::task::Poll::Ready(Some(7)));
    }

    #[test]
    fn the_socket_is_reported_until_read_and_not_while_held() {
        let (mut p, rx, _other, tx) = poller();
        let started = Instant::now();
        assert_eq!(
            p.wait(true, None, Duration::from_millis(20)),
            Ready::default()
        );
        assert!(started.elapsed() >= Duration::from_millis(20));
        tx.send_to(b"x", rx.local_addr().expect("addr"))
            .expect("send");
        let ready = p.wait(true, None, Duration::from_secs(5));
        assert!(ready.udp && !ready.bell && !ready.tun && !ready.capture);
        // Level-triggered: still there, still reported; left out while held.
        assert!(p.wait(true, None, Duration::ZERO).udp);
        assert!(!p.wait(false, None, Duration::ZERO).udp);
        assert!(p.wait(true, None, Duration::ZERO).udp);
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).expect("recv"), 1);
        assert!(!p.wait(true, None, Duration::ZERO).udp);
    }

    #[test]
    fn without_epoll_pwait2_the_millisecond_wait_works_alike() {
        let (mut p, rx, _other, tx) = poller();
        p.precise = false;
        let started = Instant::now();
        // 1.5 ms rounds up to 2: never earlier than asked.
        assert_eq!(
            p.wait(true, None, Duration::from_micros(1500)),
            Ready::default()
        );
        assert!(started.elapsed() >= Duration::from_micros(1500));
        tx.send_to(b"x", rx.local_addr().expect("addr"))
            .expect("send");
        assert!(p.wait(true, None, Duration::from_secs(5)).udp);
        p.bell().ring();
        assert!(p.wait(true, None, Duration::ZERO).bell);
    }

    #[test]
    fn a_capture_descriptor_is_watched_once_given() {
        let (mut p, _rx, _other, tx) = poller();
        let capture = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.send_to(b"x", capture.local_addr().expect("addr"))
            .expect("send");
        // Not watched yet: the wait times out; then given, it is reported.
        assert!(!p.wait(true, None, Duration::from_millis(50)).capture);
        assert!(
            p.wait(true, Some(capture.as_raw_fd()), Duration::from_secs(5))
                .capture
        );
        assert!(!p.wait(true, None, Duration::ZERO).capture);
    }
}
