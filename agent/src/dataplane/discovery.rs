//! The engine's discovery glue: broadcasts and multicasts read from the TUN device or captured
//! leaving the physical interface go to the peers the rules of
//! [`rally_agent_core::discovery`] pick; what peers send is delivered by the same rules; the
//! groups programs here listen to are joined on the TUN device and told to the peers.

use std::sync::Arc;
use std::time::Duration;

use rally_agent_core::discovery::{DiscoveryEvent, Inbound, Origin, Outbound, Targets};
use rally_proto::Key32;
use tracing::{debug, trace};

use super::engine::{Buffers, Engine};
use super::timers::{now, unix_ms};
use crate::events::{Event, EventType};

/// How often the groups programs listen to are read again and the capture follows the default
/// route (IGMP reports wake it sooner).
pub(super) const DISCOVERY_TICK: Duration = Duration::from_secs(5);
/// How often the peers are told our groups again (a lost message is mended by the next).
const RESEND_EVERY: u32 = 6;

/// What a packet sent inside a tunnel is, for the connection manager's idea of busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// A program's packet (a broadcast or multicast copy): the peer is busy.
    Data,
    /// Discovery's own message (a subscription): not activity.
    Control,
}

/// Where a decrypted packet goes ([`Engine::accept_inbound_destination`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// To the TUN device.
    Tun,
    /// Nowhere (refused; counted where refused).
    Drop,
    /// Consumed by discovery (a subscription message): not the peer's activity.
    Control,
}

impl Engine {
    /// A packet read from the TUN device to a broadcast or multicast address.
    pub(super) fn discovery_from_tun(&mut self, packet: &[u8], out: &mut [u8]) {
        let mut p = packet.to_vec();
        self.discovery_local(&mut p, Origin::Tun, out);
    }

    /// Everything the capture holds.
    pub(super) fn discovery_capture(&mut self, b: &mut Buffers) {
        // Bounded: a flood yields to the rest of the loop after a batch.
        for _ in 0..256 {
            let Some(n) = self.disc_io.try_recv() else {
                break;
            };
            let mut p = self.disc_io.buf[..n].to_vec();
            self.discovery_local(&mut p, Origin::Capture, &mut b.out);
        }
    }

    fn discovery_local(&mut self, p: &mut [u8], origin: Origin, out: &mut [u8]) {
        match self.disc.handle_local(p, origin, now()) {
            Outbound::Forward(targets) => {
                let ids: Vec<Key32> = match targets {
                    Targets::AllPeers => self
                        .node
                        .peers()
                        .filter(|(_, s)| self.disc.peer_allowed(&s.info().parties))
                        .map(|(id, _)| *id)
                        .collect(),
                    Targets::Subscribers(group) => self
                        .disc
                        .subscribers(group)
                        .filter(|id| {
                            self.node
                                .peer(id)
                                .is_some_and(|s| self.disc.peer_allowed(&s.info().parties))
                        })
                        .copied()
                        .collect(),
                };
                self.disc.note_copies(ids.len());
                for id in ids {
                    self.send_inner(id, p.to_vec(), Traffic::Data, out);
                }
            }
            Outbound::Membership => self.discovery_rescan(),
            Outbound::Dropped(why) => trace!(?why, "discovery dropped a local packet"),
            Outbound::NotDiscovery => {}
        }
    }

    /// Encrypts an inner packet for `id` and sends it on its route, or holds it until one.
    /// Only data (a broadcast or multicast copy) makes the peer busy: a subscription message,
    /// repeated to every peer every 30 s while programs here listen to a group, must not keep
    /// idle peers probed at the busy cadence.
    fn send_inner(&mut self, id: Key32, packet: Vec<u8>, kind: Traffic, out: &mut [u8]) {
        if kind == Traffic::Data {
            self.node.handle_tunnel_tx(&id, now());
        }
        match self.node.route(&id) {
            Some(route) => self.encrypt_and_send(id, route, &packet, out),
            None => self.node.enqueue(&id, packet),
        }
    }

    /// Where a packet decrypted from `peer` (its inner source already checked) goes: to the
    /// TUN device, nowhere, or (a subscription message) to discovery alone. Broadcasts, multicasts and subscription messages are discovery's; every
    /// other packet must be addressed to our virtual IP ([`super::inbound::InboundFilter`],
    /// counted there). A directed broadcast is rewritten in place to the limited broadcast.
    pub(super) fn accept_inbound_destination(&mut self, peer: &Key32, packet: &mut [u8]) -> Admit {
        let admit = |ok: bool| if ok { Admit::Tun } else { Admit::Drop };
        // The common case, unicast: only to our virtual IP (the security filter; a member's
        // modified client could otherwise reach any address this host routes).
        if !self.disc.is_discovery_packet(packet) {
            return admit(self.inbound.admits(packet));
        }
        let Some(info) = self.node.peer(peer).map(|s| Arc::clone(s.info())) else {
            return Admit::Drop;
        };
        match self
            .disc
            .handle_peer_packet(peer, &info.parties, packet, now())
        {
            Inbound::Deliver => Admit::Tun,
            Inbound::NotDiscovery => admit(self.inbound.admits(packet)),
            Inbound::Subscribed(groups) => {
                debug!(%peer, ?groups, "peer's multicast subscriptions");
                Admit::Control
            }
            Inbound::Dropped(why) => {
                trace!(%peer, ?why, "discovery dropped a packet from a peer");
                Admit::Drop
            }
        }
    }

    /// Reads the groups programs here listen to; on a change, joins them on the TUN device and
    /// tells every peer.
    pub(super) fn discovery_rescan(&mut self) {
        if !self.disc.config().enabled {
            return;
        }
        let groups = self.disc_io.local_groups();
        if self.disc.set_local_groups(groups) {
            let groups = self.disc.local_groups().clone();
            debug!(?groups, "local multicast groups changed");
            self.disc_io.sync_joins(&groups);
            self.disc_pending = self.node.peers().map(|(id, _)| *id).collect();
        }
    }

    /// The periodic slot: follow the default route, read the groups again, and now and then
    /// repeat our subscriptions to every peer.
    pub(super) fn discovery_tick(&mut self) {
        if !self.disc.config().enabled {
            self.disc_due = tokio::time::Instant::now() + Duration::from_secs(3600);
            return;
        }
        self.disc_due = self.idle_slot(tokio::time::Instant::now() + DISCOVERY_TICK);
        self.disc_io.follow_default_route();
        self.discovery_rescan();
        self.disc_ticks = self.disc_ticks.wrapping_add(1);
        if self.disc_ticks.is_multiple_of(RESEND_EVERY) && !self.disc.local_groups().is_empty() {
            self.disc_pending = self.node.peers().map(|(id, _)| *id).collect();
        }
    }

    /// A peer joined: it needs our groups.
    pub(super) fn discovery_peer_added(&mut self, peer: Key32) {
        if !self.disc.local_groups().is_empty() {
            self.disc_pending.push(peer);
        }
    }

    /// Sends the subscription messages due and publishes discovery's events.
    pub(super) fn discovery_flush(&mut self, out: &mut [u8]) {
        while let Some(DiscoveryEvent::Capped { source, port }) = self.disc.poll_event() {
            let rate = self.disc.config().rate;
            let mut ev = Event::new(
                unix_ms(),
                EventType::DiscoveryCapped,
                format!("{source} sends more than {rate} broadcasts/multicasts per second (port {port}); the rest are dropped"),
            );
            if let Some(id) = self.node.peer_by_vip(&source) {
                if let Some(p) = self.node.peer(&id) {
                    ev = ev.with_peer(p.info().name.clone());
                }
            }
            self.publish(ev);
        }
        for id in std::mem::take(&mut self.disc_pending) {
            let Some(vip) = self
                .node
                .peer(&id)
                .filter(|s| self.disc.peer_allowed(&s.info().parties))
                .map(|s| s.info().virtual_ip)
            else {
                continue;
            };
            let msg = self.disc.subscription_for(vip);
            self.send_inner(id, msg, Traffic::Control, out);
        }
    }

    /// `rally discovery`.
    pub(super) fn discovery_status(&self) -> rally_agent_core::discovery::DiscoveryStatus {
        self.disc.status(now(), |id| {
            self.node
                .peer(id)
                .map_or_else(|| id.to_string(), |s| s.info().name.clone())
        })
    }
}
