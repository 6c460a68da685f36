use super::*;
use crate::conn::{PathId, PrimaryReason};

#[test]
fn events_history_is_bounded() {
    let mut bus = EventBus::default();
    for t in 0..150 {
        bus.publish(event(t, EventType::StateChange, "alice"));
    }

    let history = bus.history(&EventFilter::all());

    assert_eq!(history.len(), DEFAULT_HISTORY);
    assert_eq!(history.first().map(|e| e.time), Some(50));
    assert_eq!(history.last().map(|e| e.time), Some(149));
}

#[test]
fn slow_subscriber_is_told_how_many_it_missed() {
    let mut bus = EventBus::default();
    let slow = bus.subscribe_with_capacity(EventFilter::all(), 10);
    let fast = bus.subscribe_with_capacity(EventFilter::all(), 100);
    for t in 0..25 {
        bus.publish(event(t, EventType::Failover, "alice"));
    }

    let items = bus.poll(slow).unwrap();

    assert_eq!(items[0], Item::Lagged { missed: 15 });
    assert_eq!(times(&items[1..]), (15..25).collect::<Vec<u64>>());
    assert_eq!(
        times(&bus.poll(fast).unwrap()),
        (0..25).collect::<Vec<u64>>()
    );
    bus.publish(event(25, EventType::Failover, "alice"));
    assert_eq!(
        bus.poll(slow).unwrap(),
        [Item::Event(event(25, EventType::Failover, "alice"))],
        "told once, then back to normal"
    );
}

#[test]
fn subscriber_filters_by_type_and_peer() {
    let mut bus = EventBus::default();
    let by_type =
        bus.subscribe(EventFilter::all().with_types([EventType::Failover, EventType::RelaySwitch]));
    let by_peer = bus.subscribe(EventFilter::all().with_peer("alice"));
    let both = bus.subscribe(
        EventFilter::all()
            .with_types([EventType::Failover])
            .with_peer("bob"),
    );
    bus.publish(event(1, EventType::Failover, "alice"));
    bus.publish(event(2, EventType::RelaySwitch, "bob"));
    bus.publish(event(3, EventType::StateChange, "alice"));
    bus.publish(event(4, EventType::Failover, "bob"));
    bus.publish(Event::new(
        5,
        EventType::NatDetected,
        "endpoint-independent",
    ));

    assert_eq!(times(&bus.poll(by_type).unwrap()), [1, 2, 4]);
    assert_eq!(times(&bus.poll(by_peer).unwrap()), [1, 3]);
    assert_eq!(times(&bus.poll(both).unwrap()), [4]);
    let alice_failovers = EventFilter::all()
        .with_types([EventType::Failover])
        .with_peer("alice");
    assert_eq!(bus.history(&alice_failovers).len(), 1);
}

#[test]
fn an_event_serializes_to_the_json_lines_shape() {
    let ev = event(1_700_000_000_123, EventType::RelaySwitch, "alice").with_path("relay:eu");

    let json: serde_json::Value = serde_json::from_str(&ev.to_json_line()).unwrap();

    assert_eq!(
        json,
        serde_json::json!({
            "time": 1_700_000_000_123u64,
            "type": "relay_switch",
            "peer": "alice",
            "path": "relay:eu",
            "message": "something happened",
        })
    );
    assert_eq!(serde_json::from_value::<Event>(json).unwrap(), ev);
    let agent_wide = Event::new(1, EventType::NatDetected, "x").to_json_line();
    assert!(agent_wide.contains("\"peer\":null"));
}

#[test]
fn connection_events_become_typed_events() {
    let direct = PathId::Direct("203.0.113.2:51820".parse().unwrap());
    let eu = PathId::Relay("eu".into());

    let failover = Event::from_conn(
        7,
        "alice",
        &ConnEvent::Failover {
            from: direct.clone(),
            to: eu.clone(),
        },
    )
    .unwrap();
    let change = Event::from_conn(
        7,
        "alice",
        &ConnEvent::PrimaryChange {
            from: Some(direct.clone()),
            to: Some(eu.clone()),
            reason: PrimaryReason::Failover,
        },
    )
    .unwrap();
    let failed = Event::from_conn(8, "alice", &ConnEvent::Failed { attempts: 10 }).unwrap();

    assert_eq!(failover.kind, EventType::Failover);
    assert_eq!(failover.path.as_deref(), Some("relay:eu"));
    assert_eq!(
        failover.message,
        "direct:203.0.113.2:51820 failed; failed over to relay:eu"
    );
    assert_eq!(change.kind, EventType::PrimaryChange);
    assert_eq!(failed.kind, EventType::Error);
    assert_eq!(
        Event::from_conn(9, "alice", &ConnEvent::PathUp { path: direct }),
        None
    );
}

#[test]
fn event_types_parse_from_a_comma_list() {
    assert_eq!(
        EventType::parse_list("failover,relay-switch"),
        Ok(BTreeSet::from([
            EventType::Failover,
            EventType::RelaySwitch
        ]))
    );
    assert!(EventType::parse_list("failover,bogus").is_err());
}

#[test]
fn a_publish_that_queues_an_event_wakes_the_subscribers() {
    let woken = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut bus = EventBus::new(10);
    let w = woken.clone();
    bus.set_waker(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    bus.publish(event(1, EventType::Failover, "bob"));
    assert_eq!(
        woken.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no subscriber yet"
    );
    let sub = bus.subscribe(EventFilter::all().with_types([EventType::Failover]));
    bus.publish(event(2, EventType::StateChange, "bob"));
    assert_eq!(
        woken.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "filtered out"
    );
    bus.publish(event(3, EventType::Failover, "bob"));
    assert_eq!(woken.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(times(&bus.poll(sub).unwrap()), [3]);
}

#[test]
fn publishing_to_a_subscriber_with_no_room_only_counts() {
    let mut bus = EventBus::new(0);
    let sub = bus.subscribe_with_capacity(EventFilter::all(), 0);
    bus.publish(event(1, EventType::Error, "alice"));
    assert_eq!(bus.poll(sub).unwrap(), [Item::Lagged { missed: 1 }]);
    assert!(bus.history(&EventFilter::all()).is_empty());
    assert!(bus.unsubscribe(sub));
    assert_eq!(bus.poll(sub), None);
}

fn event(time: u64, kind: EventType, peer: &str) -> Event {
    Event::new(time, kind, "something happened").with_peer(peer)
}

fn times(items: &[Item]) -> Vec<u64> {
    items
        .iter()
        .map(|i| match i {
            Item::Event(e) => e.time,
            Item::Lagged { .. } => panic!("unexpected {i:?}"),
        })
        .collect()
}
