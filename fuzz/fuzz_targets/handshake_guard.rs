//! The handshake guard (rally-agent-core) on a script of datagrams from several sources over
//! time: raw bytes, and handshake initiations and responses with a correct mac1 (which
//! libFuzzer would practically never find by itself), so the load, cookie-reply and budget
//! paths run too. Checked:
//! - a datagram that is not handshake-shaped passes untouched and is not counted;
//! - a message with a correct mac1 is never dropped for its mac1;
//! - a cookie reply goes only to a direct address, is 64 bytes (fewer than it answers: no
//!   amplification) and names the sender index of the message it answers;
//! - the counters add up to the handshake-shaped datagrams seen;
//! - the handshakes let through stay within the global budget over the script's time.
//!
//! Script: ops of two bytes and what they take. `op % 4`: 0 = time step of `arg`·8 ms;
//! 1 = a raw datagram of `arg` bytes from the input; 2 = an initiation, 3 = a response (the
//! sender index from 4 bytes of input, the rest `arg`, then a correct mac1: short enough that
//! one input holds the hundreds it takes to put the guard under load). For 1–3, `arg` also
//! picks the source (relayed, IPv4 or IPv6).
#![no_main]

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rally_agent_core::handshake_guard::{
    is_handshake, GuardDrop, HandshakeGuard, Source, Verdict, GLOBAL_RATE,
};
use rally_agent_core::wg_cookie::{write_mac1, COOKIE_REPLY_LEN};

const ME: [u8; 32] = [9; 32];

fuzz_target!(|data: &[u8]| {
    // A fixed origin: the guard takes time as a parameter.
    #[allow(clippy::disallowed_methods)]
    let t0 = Instant::now();
    let mut now = t0;
    let mut guard = HandshakeGuard::new(&ME, [1; 32], t0);
    let mut dst = [0u8; 148];
    let mut handshakes = 0u64;
    let mut rest = data;
    while let [op, arg, tail @ ..] = rest {
        rest = tail;
        let (len, mac1) = match op % 4 {
            0 => {
                now += Duration::from_millis(u64::from(*arg) * 8);
                guard.handle_timeout(now);
                continue;
            }
            1 => (usize::from(*arg), false),
            2 => (148, true),
            _ => (92, true),
        };
        let take = if mac1 { 4 } else { len }.min(rest.len());
        let mut d = if mac1 {
            vec![*arg; len]
        } else {
            Vec::with_capacity(len)
        };
        if mac1 {
            d[..4].copy_from_slice(&[if len == 148 { 1 } else { 2 }, 0, 0, 0]);
            d[4..4 + take].copy_from_slice(&rest[..take]);
            write_mac1(&ME, &mut d);
        } else {
            d.extend_from_slice(&rest[..take]);
        }
        rest = &rest[take..];
        let source = source(*arg);
        let before = guard.stats();
        let verdict = guard.check(source, &d, now, &mut dst);
        if !is_handshake(&d) {
            assert_eq!(verdict, Verdict::Pass);
            assert_eq!(
                guard.stats(),
                before,
                "counted a datagram that is no handshake"
            );
            continue;
        }
        handshakes += 1;
        match verdict {
            Verdict::Drop(GuardDrop::BadMac1) => assert!(!mac1, "a correct mac1 was refused"),
            Verdict::CookieReply(reply) => {
                assert!(
                    matches!(source, Source::Addr(_)),
                    "a cookie reply to a relayed sender"
                );
                assert_eq!(reply.len(), COOKIE_REPLY_LEN);
                assert!(reply.len() < d.len(), "the cookie reply amplifies");
                assert_eq!(reply[..4], [3, 0, 0, 0]);
                assert_eq!(reply[4..8], d[4..8], "the reply names another sender index");
            }
            Verdict::Drop(_) | Verdict::Pass => {}
        }
    }
    let s = guard.stats();
    assert_eq!(s.passed + s.dropped() + s.cookie_replies, handshakes);
    let budget = GLOBAL_RATE * (1.0 + now.duration_since(t0).as_secs_f64());
    assert!(
        s.passed as f64 <= budget + 1.0,
        "{} handshakes through, budget {budget}",
        s.passed
    );
});

/// A relayed sender, or an IPv4 or IPv6 address (two ports each): few enough that one source
/// meets its own budget.
fn source(arg: u8) -> Source {
    let n = arg & 0x1f;
    let port = 51820 + u16::from(arg >> 5 & 1);
    match arg >> 6 {
        0 => Source::Relayed([n; 8]),
        1 => Source::Addr(SocketAddr::from(([192, 0, 2, n], port))),
        _ => Source::Addr(SocketAddr::from((
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(n)),
            port,
        ))),
    }
}
