//! The data plane's devices at start-up: the TUN device (with offload where the kernel allows
//! it) and the sizes of its queue and of the UDP socket's buffers.

use std::net::Ipv4Addr;

use rally_udp::grow_socket_buffers;
use tracing::{info, warn};

use super::engine::EngineConfig;

/// The TUN device, with offload (TSO/GRO: one read or write carries up to 64 KiB) when the
/// kernel allows it; the second value says whether it does.
pub(super) fn open_tun(cfg: &EngineConfig) -> std::io::Result<(tun_rs::SyncDevice, bool)> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&cfg.tun_name)
            .ipv4(cfg.virtual_ip, cfg.prefix, None)
            .mtu(1420)
            .offload(offload)
            .build_sync()
    };
    match build(true) {
        Ok(t) => Ok((t, true)),
        Err(e) => {
            warn!("TUN offload unavailable ({e}); one packet per read and write");
            Ok((build(false)?, false))
        }
    }
}

/// Sizes the TUN device's queue and the UDP socket's buffers, sets up the data plane's queues
/// (and the thread's priority), and logs the device.
pub(super) fn tune_io(
    (tun_name, virtual_ip): (&str, Ipv4Addr),
    tun: &tun_rs::SyncDevice,
    udp: &std::net::UdpSocket,
    udp_state: &quinn_udp::UdpSocketState,
    offload: bool,
) -> super::queues::Queues {
    // GSO sends and GRO receives move up to 64 datagrams at a time, which overflows the
    // kernel's ~200 KiB default under load; more than a bandwidth-delay product only
    // holds packets back.
    if let Some(n) = super::queues::env_usize(super::queues::TXQLEN_ENV) {
        if let Err(e) = tun.set_tx_queue_len(u32::try_from(n).unwrap_or(u32::MAX)) {
            warn!("TUN txqueuelen {n}: {e}");
        }
    }
    let queues = super::queues::Queues::from_env();
    queues.raise_thread_priority();
    let (rcvbuf, sndbuf) = grow_socket_buffers(udp, queues.socket_buffer());
    info!(
        tun = %tun_name,
        %virtual_ip,
        offload,
        udp_gso_segments = udp_state.max_gso_segments(),
        udp_gro_segments = udp_state.gro_segments(),
        rcvbuf,
        sndbuf,
        queues = queues.enabled,
        txqueuelen = ?tun.tx_queue_len(),
        "TUN device up"
    );
    queues
}
