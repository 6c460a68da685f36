//! Capturing the limited broadcasts and multicasts programs send out of the physical
//! default-route interface, without taking them away from the LAN: an `AF_PACKET` socket sees a
//! copy of each outgoing frame, and a classic BPF filter in the kernel keeps only outgoing UDP
//! to 255.255.255.255 or 224.0.0.0/4 (unfragmented) and IGMP (membership reports), so the agent
//! wakes for nothing else.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: the BPF load of the packet's type.
const LOAD_PKTTYPE: u32 = (-0x1000i32 + 4) as u32;
/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: the BPF load of the frame's ethertype.
const LOAD_PROTOCOL: u32 = (-0x1000i32) as u32;
/// Only `ETH_P_ALL` sockets see outgoing frames (the filter keeps IPv4).
const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u32 = 4;
const ETH_P_IP: u16 = 0x0800;

// Classic BPF opcodes (linux/bpf_common.h): class | size | mode, or class | op | source.
/// `BPF_LD | BPF_W | BPF_ABS`
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_LD | BPF_H | BPF_ABS`
const BPF_LD_H_ABS: u16 = 0x28;
/// `BPF_LD | BPF_B | BPF_ABS`
const BPF_LD_B_ABS: u16 = 0x30;
/// `BPF_JMP | BPF_JEQ | BPF_K`
const BPF_JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JSET | BPF_K`
const BPF_JSET_K: u16 = 0x45;
/// `BPF_ALU | BPF_AND | BPF_K`
const BPF_AND_K: u16 = 0x54;
/// `BPF_RET | BPF_K`
const BPF_RET_K: u16 = 0x06;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter, run on the IP header (a `SOCK_DGRAM` packet socket sees no link header); the
/// ethertype and direction come from the kernel's ancillary loads.
fn program() -> Vec<libc::sock_filter> {
    const ACCEPT: u32 = 65_535;
    vec![
        /* 0 */ op(BPF_LD_H_ABS, 0, 0, LOAD_PROTOCOL),
        /* 1 */ op(BPF_JEQ_K, 0, 12, u32::from(ETH_P_IP)), // → 14 reject
        /* 2 */ op(BPF_LD_W_ABS, 0, 0, LOAD_PKTTYPE),
        /* 3 */ op(BPF_JEQ_K, 0, 10, PACKET_OUTGOING), // → 14
        /* 4 */ op(BPF_LD_B_ABS, 0, 0, 9),
        /* 5 */ op(BPF_JEQ_K, 7, 0, 2), // IGMP → 13 accept
        /* 6 */ op(BPF_JEQ_K, 0, 7, 17), // not UDP → 14
        /* 7 */ op(BPF_LD_H_ABS, 0, 0, 6),
        /* 8 */ op(BPF_JSET_K, 5, 0, 0x3fff), // a fragment → 14
        /* 9 */ op(BPF_LD_W_ABS, 0, 0, 16),
        /* 10 */ op(BPF_JEQ_K, 2, 0, 0xffff_ffff), // limited broadcast → 13
        /* 11 */ op(BPF_AND_K, 0, 0, 0xf000_0000),
        /* 12 */ op(BPF_JEQ_K, 0, 1, 0xe000_0000), // multicast → 13, else 14
        /* 13 */ op(BPF_RET_K, 0, 0, ACCEPT),
        /* 14 */ op(BPF_RET_K, 0, 0, 0),
    ]
}

/// An `AF_PACKET` socket on one interface, filtered as above.
pub struct Capture {
    /// Non-blocking; the data-plane thread's wait watches it.
    fd: OwnedFd,
    pub ifname: String,
}

impl Capture {
    /// Opens the capture on `ifname` (needs `CAP_NET_RAW`, which the agent has for its TUN).
    pub fn open(ifname: &str) -> io::Result<Capture> {
        let index = super::membership::if_index(ifname)?;
        // Protocol 0 first: nothing is queued before the filter is in place.
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let prog = program();
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below are plain integers.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Capture {
            fd,
            ifname: ifname.to_owned(),
        })
    }

    /// The descriptor to wait on (readable when a packet is queued).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet without blocking; `Ok(None)` when none is queued.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// The interface of the default IPv4 route (lowest metric), from `/proc/net/route` (its
/// text: `routes`).
pub fn default_route_interface(routes: &str) -> Option<String> {
    parse_default_route(routes)
}

fn parse_default_route(text: &str) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask …
            let (iface, dst, flags, metric, mask) =
                (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
            (up && *dst == "00000000" && *mask == "00000000")
                .then(|| (metric.parse::<u32>().unwrap_or(u32::MAX), iface.to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            rally0\t0000420A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_route(text).as_deref(), Some("eth0"));
        assert_eq!(parse_default_route("Iface\n"), None);
    }

    #[test]
    fn the_filter_jumps_stay_inside_the_program() {
        let p = program();
        for (i, ins) in p.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + (ins.jt.max(ins.jf) as usize) < p.len());
            }
        }
    }
}
