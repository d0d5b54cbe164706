// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Eventq events and their overflow (contract section 8;
//! `src/exporter/events.rs`).

use super::helpers::*;

#[test]
fn events_beyond_the_pending_limit_become_one_overflow() {
    let mut d = Dev::with_limits(Limits {
        max_pending_events: 2,
        ..Limits::default()
    });
    let mut atts = Vec::new();
    for _ in 0..4 {
        let o = d.create(0, 1, true, false);
        atts.push(d.attach(0, o, true));
    }
    let uuids: Vec<_> = d.ex.list().iter().map(|o| o.uuid).collect();
    let now = d.now;
    for (i, u) in uuids.into_iter().enumerate() {
        assert_eq!(
            d.ex.host_evict(u, i as u64, Duration::from_secs(1), now),
            Some(Ok(()))
        );
    }
    let kinds: Vec<(EventType, u64)> = std::iter::from_fn(|| d.ex.pop_event(0))
        .map(|e| (e.kind, e.data))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventType::MoveNotify, 1),
            (EventType::MoveNotify, 1),
            (EventType::Overflow, 2)
        ]
    );
}
