//! The agent's side of the control channel.

pub mod client;
mod link;
pub mod proxy;
pub mod tls;

pub use client::{
    spawn, ControlCmd, ControlError, ControlEvent, ControlHandle, ControlTransport, Registration,
};
