//! Rally's wire vocabulary: control messages and their frame codec, identities and signatures,
//! invite codes, and virtual-IP derivation.
//!
//! This crate is pure: it performs no IO, reads no clock and draws no randomness. Callers pass
//! time and random bytes in.

pub mod control;
pub mod frame;
pub mod http;
pub mod identity;
pub mod invite;
pub mod key;
pub mod keyfile;
pub mod limit;
pub mod peermap;
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod relay_stream;
pub mod stun;
pub mod token;
pub mod vip;

pub use control::{
    ClientMsg, ErrorCode, ErrorReply, NatBehavior, NatReport, PartyInfo, PeerChange, PeerInfo,
    RelayEntry, RelayLatency, Request, Response, ServerMsg, Sig64,
};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use identity::{Identity, SignatureError};
pub use invite::{InviteCode, InviteError};
pub use key::{Key32, KeyParseError};
pub use peermap::{DeltaError, MapPages, PageError, PeerEvent, PeerView};
pub use token::{RelayToken, TokenError};
pub use vip::{Overlay, OverlayError};

/// Protocol version spoken on the control channel (2: versioned peer maps with deltas; 3: peer
/// entries as compact arrays, [`PeerInfo::wire`]).
pub const PROTOCOL_VERSION: u16 = 3;
