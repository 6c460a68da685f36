//! The `Send` → `Deliver` path of the core performs no heap allocation: the datagram is
//! rewritten in place and the action is a plain value.

// The fake clock's origin is read once; everything after is arithmetic.
#![allow(clippy::disallowed_methods)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use rally_proto::relay::{bind_transcript, short_id, RelayMsg, DOMAIN_BIND};
use rally_proto::{Identity, RelayToken};
use rally_relay::{Action, Config, Relay, Via};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

#[test]
fn forwarding_allocates_nothing() {
    let control = Identity::from_seed([1; 32]);
    let start = Instant::now();
    let mut relay = Relay::new(
        Config::new(control.public(), "198.51.100.1:3478".parse().unwrap()),
        [9; 32],
        start,
    );
    let (a, b) = (Identity::from_seed([2; 32]), Identity::from_seed([3; 32]));
    let (a_addr, b_addr) = (
        "192.0.2.1:1000".parse().unwrap(),
        "192.0.2.2:1000".parse().unwrap(),
    );
    for (id, addr) in [(&a, a_addr), (&b, b_addr)] {
        let mut req = RelayMsg::BindRequest.to_vec();
        let Action::Reply(t) = relay.handle_datagram(Via::Primary, addr, &mut req, start, 1000)
        else {
            panic!("no challenge");
        };
        let Ok(RelayMsg::BindChallenge { cookie }) = RelayMsg::decode(&t.payload) else {
            panic!("not a challenge");
        };
        let token = RelayToken {
            agent: id.public(),
            expires_at: 5000,
            parties: vec![[7; 8]],
        }
        .sign(&control);
        let mut bind = RelayMsg::Bind {
            cookie,
            signature: id.sign(DOMAIN_BIND, &bind_transcript(&cookie, &token)),
            token: &token,
        }
        .to_vec();
        let action = relay.handle_datagram(Via::Primary, addr, &mut bind, start, 1000);
        assert!(matches!(action, Action::Reply(_)), "{action:?}");
    }
    let to_b = RelayMsg::Send {
        to: short_id(&b.public()),
        payload: &[0x55; 1200],
    }
    .to_vec();
    let mut buf = vec![0u8; 65_535];

    let before = allocations();
    for i in 0..1000u64 {
        let now = start + Duration::from_micros(i * 100);
        buf[..to_b.len()].copy_from_slice(&to_b);
        let action = relay.handle_datagram(Via::Primary, a_addr, &mut buf[..to_b.len()], now, 1000);
        assert!(
            matches!(action, Action::Forward { to, len, .. } if to == b_addr && len == to_b.len()),
            "not forwarded"
        );
    }
    let after = allocations();

    assert_eq!(after - before, 0, "the forwarding path allocated");
}
