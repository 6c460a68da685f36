//! The plain UDP forwarder baseline (the hidden `bench-udp-forward` subcommand).

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use rally_proto::relay::{send_to_deliver, ShortId, DATA_HEADER_LEN};

use crate::bench::mmsg::{self, send_batch, RecvBatch};

use super::STATS_QUERY;

/// The plain forwarder (the hidden `bench-udp-forward` subcommand): learns each source's
/// short id from its first datagram (echoing it), then rewrites `Send{to}` into
/// `Deliver{from}` and sends it to `to`'s address; `STATS?` is answered with the count.
/// `batch` 1 uses `recv_from`/`send_to`, more uses `recvmmsg`/`sendmmsg` of that many.
pub fn forward(listen: SocketAddrV4, batch: usize) -> Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    mmsg::set_buffer(sock.as_raw_fd(), true, 4 << 20);
    mmsg::set_buffer(sock.as_raw_fd(), false, 4 << 20);
    println!("forwarding on {listen}, batch {batch}");
    let mut by_id: HashMap<ShortId, SocketAddrV4> = HashMap::new();
    let mut by_addr: HashMap<SocketAddrV4, ShortId> = HashMap::new();
    let mut forwarded = 0u64;
    let mut handle = |d: &mut [u8], from: SocketAddrV4| -> Option<(SocketAddrV4, bool)> {
        if d == STATS_QUERY {
            return None;
        }
        match by_addr.get(&from) {
            None => {
                if d.len() < DATA_HEADER_LEN {
                    return None;
                }
                let id: ShortId = d[4..DATA_HEADER_LEN].try_into().ok()?;
                by_id.insert(id, from);
                by_addr.insert(from, id);
                Some((from, false))
            }
            Some(from_id) => {
                let to = send_to_deliver(d, from_id)?;
                by_id.get(&to).map(|a| (*a, true))
            }
        }
    };
    if batch <= 1 {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = sock.recv_from(&mut buf)?;
            let SocketAddr::V4(from) = from else { continue };
            if &buf[..n] == STATS_QUERY {
                sock.send_to(&forwarded.to_le_bytes(), from)?;
                continue;
            }
            if let Some((to, fwd)) = handle(&mut buf[..n], from) {
                let _ = sock.send_to(&buf[..n], to);
                forwarded += u64::from(fwd);
            }
        }
    }
    let mut rx = RecvBatch::new(batch, 2048);
    let mut dest: Vec<SocketAddrV4> = Vec::with_capacity(batch);
    let mut idx: Vec<usize> = Vec::with_capacity(batch);
    loop {
        let n = rx.recv(sock.as_raw_fd(), libc::MSG_WAITFORONE)?;
        dest.clear();
        idx.clear();
        for i in 0..n {
            let from = rx.addr(i);
            if rx.buf(i) == STATS_QUERY {
                sock.send_to(&forwarded.to_le_bytes(), from)?;
                continue;
            }
            if let Some((to, fwd)) = handle(rx.buf_mut(i), from) {
                dest.push(to);
                idx.push(i);
                forwarded += u64::from(fwd);
            }
        }
        let bufs: Vec<&[u8]> = idx.iter().map(|&i| rx.buf(i)).collect();
        let mut sent = 0;
        while sent < bufs.len() {
            match send_batch(sock.as_raw_fd(), &bufs[sent..], Some(&dest[sent..]), 0) {
                Ok(k) => sent += k.max(1),
                Err(_) => break,
            }
        }
    }
}
