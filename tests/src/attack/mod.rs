//! Small attack clients that speak Rally's real protocols, for lab tests of abuse: each runs in
//! a lab host's namespace ([`crate::netns::in_ns`]) against the real binaries.

pub mod control;
