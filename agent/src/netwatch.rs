//! Notices network changes from the kernel: a netlink route socket subscribed to link and IPv4
//! address/route changes. Each burst of messages becomes one wake-up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// A subscription to the kernel's link, address and route changes.
pub struct NetWatch {
    fd: AsyncFd<OwnedFd>,
}

impl NetWatch {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use and owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value before we fill it in.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed with it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd keeps its descriptor open, and always the same one, until it is
        // dropped with the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(NetWatch { fd })
    }

    /// Waits for the next change, then reads away everything queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable_mut().await?;
        let mut buf = [0u8; 8192];
        loop {
            match read(guard.get_inner().as_raw_fd(), &mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_netlink_subscription_opens() {
        // Opening needs no privilege; the change itself is exercised by the lab.
        assert!(NetWatch::new().is_ok());
    }
}
