//! The emulator's system calls: AF_PACKET sockets, `recvmmsg`/`sendmmsg` batches, `ppoll`, and
//! the ethtool ioctl that turns offloads off.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::{BATCH, SLOT, SOCKET_BUFFER};

/// Turns off segmentation, receive coalescing, scatter-gather and checksum offload on device
/// `ifname` of the calling thread's namespace, so frames crossing the emulator are whole and
/// carry real checksums (`ethtool -K IF tso off gso off gro off sg off tx off`, without
/// needing ethtool).
pub(crate) fn disable_offloads(ifname: &str) -> Result<()> {
    // Legacy ethtool commands; the kernel maps each onto the matching netdev feature.
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_SSG: u32 = 0x19;
    const ETHTOOL_STSO: u32 = 0x1f;
    const ETHTOOL_SGSO: u32 = 0x24;
    const ETHTOOL_SGRO: u32 = 0x2c;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;

    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfreqData {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }

    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let mut req = IfreqData {
        name: ifname_array(ifname)?,
        data: std::ptr::null_mut(),
        _pad: [0; 16],
    };
    for cmd in [
        ETHTOOL_STSO,
        ETHTOOL_SGSO,
        ETHTOOL_SGRO,
        ETHTOOL_SSG,
        ETHTOOL_STXCSUM,
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        req.data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: `req` is an ifreq-shaped struct whose data points at a live ethtool_value.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("ethtool command {cmd:#x} on {ifname}"));
        }
    }
    Ok(())
}

/// Reusable `recvmmsg`/`sendmmsg` arrays. They hold raw pointers into a `Queue`, valid only
/// during one call.
pub(super) struct Batch {
    hdrs: [libc::mmsghdr; BATCH],
    iovs: [libc::iovec; BATCH],
    addrs: [libc::sockaddr_ll; BATCH],
    scratch: Box<[u8; SLOT]>,
}

impl Batch {
    pub(super) fn new() -> Batch {
        // SAFETY: all three are plain C structs for which all-zero is a valid value.
        unsafe {
            Batch {
                hdrs: mem::zeroed(),
                iovs: mem::zeroed(),
                addrs: mem::zeroed(),
                scratch: Box::new([0; SLOT]),
            }
        }
    }

    /// Receives up to `room` frames into consecutive slots starting at `base`; returns how many.
    pub(super) fn recv(&mut self, fd: RawFd, base: *mut u8, room: usize) -> usize {
        for i in 0..room {
            self.iovs[i] = libc::iovec {
                // SAFETY: the caller guarantees `room` slots of SLOT bytes from `base`.
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            self.point(i);
        }
        // SAFETY: the first `room` headers point at live iovecs, buffers and addresses.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                room as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).unwrap_or(0)
    }

    /// Receives and discards up to a batch of frames; returns how many.
    pub(super) fn recv_scratch(&mut self, fd: RawFd) -> usize {
        let mut n = 0;
        while n < BATCH {
            // SAFETY: reads at most SLOT bytes into the scratch buffer.
            let rc = unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr().cast(),
                    SLOT,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                break;
            }
            n += 1;
        }
        n
    }

    /// Frame `i` of the last `recv`: (length, truncated, outgoing).
    pub(super) fn received(&self, i: usize) -> (usize, bool, bool) {
        let hdr = &self.hdrs[i];
        let len = hdr.msg_len as usize;
        let truncated = len > SLOT || hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let outgoing = self.addrs[i].sll_pkttype == PACKET_OUTGOING;
        (len.min(SLOT), truncated, outgoing)
    }

    /// Sends slots `first .. first + n` of `buf` (lengths in `len`); returns how many went.
    pub(super) fn send(
        &mut self,
        fd: RawFd,
        buf: &[u8],
        len: &[u16],
        first: usize,
        n: usize,
    ) -> io::Result<usize> {
        for i in 0..n {
            let slot = first + i;
            self.iovs[i] = libc::iovec {
                iov_base: buf[slot * SLOT..].as_ptr() as *mut libc::c_void,
                iov_len: usize::from(len[slot]),
            };
            self.hdrs[i] = libc::mmsghdr {
                // SAFETY: msghdr is a plain C struct; all-zero is valid.
                msg_hdr: unsafe { mem::zeroed() },
                msg_len: 0,
            };
            self.hdrs[i].msg_hdr.msg_iov = &mut self.iovs[i];
            self.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers point at live iovecs over `buf`, which the kernel only
        // reads. The socket is bound to its device, so no address is needed.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Points header `i` at iovec `i` and address `i`.
    fn point(&mut self, i: usize) {
        // SAFETY: msghdr is a plain C struct; all-zero is valid.
        self.hdrs[i].msg_hdr = unsafe { mem::zeroed() };
        self.hdrs[i].msg_hdr.msg_iov = &mut self.iovs[i];
        self.hdrs[i].msg_hdr.msg_iovlen = 1;
        self.hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_ll).cast();
        self.hdrs[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as u32;
        self.hdrs[i].msg_len = 0;
    }
}

/// `sll_pkttype` of frames this host sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;
/// Socket option: do not deliver our own outgoing frames back to us (Linux ≥ 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// An AF_PACKET raw socket bound to one device, in promiscuous mode.
pub(super) struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket on `ifname` in the calling thread's namespace.
    pub(super) fn open(ifname: &str) -> Result<PacketSocket> {
        let cname = CString::new(ifname)?;
        // SAFETY: `cname` is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("no device {ifname}"));
        }
        // Protocol 0 receives nothing until bound, so no other device's frames slip in.
        let fd = socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
        .context("opening an AF_PACKET socket")?;
        // SAFETY: sockaddr_ll is a plain C struct; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: binds to a live sockaddr_ll of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("binding to {ifname}"));
        }
        // SAFETY: packet_mreq is a plain C struct; all-zero is valid.
        let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .with_context(|| format!("promiscuous mode on {ifname}"))?;
        // Best effort: frames marked outgoing are skipped in any case.
        let _ = setsockopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1);
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &SOCKET_BUFFER)
            .context("SO_RCVBUFFORCE")?;
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &SOCKET_BUFFER)
            .context("SO_SNDBUFFORCE")?;
        Ok(PacketSocket { fd })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: no timeout). Returns which
/// are readable. A socket error (e.g. its device went down) is read and cleared, so it does not
/// wake the loop again.
pub(super) fn wait(fds: [RawFd; 3], timeout: Option<Duration>) -> io::Result<[bool; 3]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: three live pollfds and an optional live timespec.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), 3, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok([false; 3]);
        }
        return Err(e);
    }
    for p in &pfds {
        if p.revents & libc::POLLERR != 0 {
            let mut err: libc::c_int = 0;
            let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads SO_ERROR into a live c_int.
            unsafe {
                libc::getsockopt(
                    p.fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut libc::c_int).cast(),
                    &mut len,
                );
            }
        }
    }
    Ok(pfds.map(|p| p.revents & libc::POLLIN != 0))
}

pub(super) fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(2)");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> Result<()> {
    // SAFETY: passes a live value of its own size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt {level}/{name}"));
    }
    Ok(())
}

/// `ifname` as a NUL-padded `IFNAMSIZ` array.
pub(super) fn ifname_array(ifname: &str) -> Result<[libc::c_char; libc::IFNAMSIZ]> {
    if ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(anyhow!("bad device name {ifname:?}"));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(name)
}
