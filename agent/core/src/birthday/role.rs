//! Which side of a birthday pair this agent plays, decided from both NAT reports.

use std::net::{IpAddr, SocketAddr};

use rally_proto::control::{NatBehavior, NatReport};

use super::MAX_DELTA;

/// Which side of a birthday pair this agent plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This agent maps endpoint-dependently: open sockets towards the peer's `target`.
    Open { target: SocketAddr },
    /// The peer maps endpoint-dependently: probe ports of its public `ip`, predicted ones
    /// first when `predict` (its reported port and step) is known.
    Probe {
        ip: IpAddr,
        predict: Option<(u16, i32)>,
    },
}

impl Role {
    /// The role the NAT reports give this agent towards the peer, if birthday punching is
    /// worth it: one side endpoint-dependent, the other endpoint-independent and filtering by
    /// address and port (or unknown), and no gateway port mapping on either side (a mapped
    /// endpoint is reachable by ordinary punching).
    pub fn decide(mine: Option<&NatReport>, theirs: Option<&NatReport>) -> Option<Role> {
        let (mine, theirs) = (mine?, theirs?);
        if !mine.udp || !theirs.udp || mine.mapped_endpoint.is_some() {
            return None;
        }
        if theirs.mapped_endpoint.is_some() {
            return None;
        }
        let strict = |f: NatBehavior| {
            matches!(
                f,
                NatBehavior::AddressAndPortDependent | NatBehavior::Unknown
            )
        };
        let cone = |n: &NatReport| n.mapping == NatBehavior::EndpointIndependent;
        if mine.mapping.is_endpoint_dependent() && cone(theirs) && strict(theirs.filtering) {
            return Some(Role::Open {
                target: theirs.public_endpoint?,
            });
        }
        if theirs.mapping.is_endpoint_dependent() && cone(mine) && strict(mine.filtering) {
            let public = theirs.public_endpoint?;
            let predict = theirs
                .port_delta
                .map(i32::from)
                .filter(|d| *d != 0 && d.abs() <= MAX_DELTA)
                .map(|d| (public.port(), d));
            return Some(Role::Probe {
                ip: public.ip(),
                predict,
            });
        }
        None
    }
}
