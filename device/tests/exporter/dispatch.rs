// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CANCEL and queue stops, which end parked requests (contract section 7.1;
//! `src/exporter/mod.rs` and `pending.rs`).

use super::helpers::*;

#[test]
fn cancel_ends_the_waiting_request_with_that_tag() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, o);
    let t = d.park(0, Dev::lock_req(c2, o));
    d.ok(0, Request::Cancel { tag: t });
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
}

#[test]
fn cancel_of_unknown_tag_is_enoent() {
    let mut d = Dev::new();
    assert_eq!(d.err(0, Request::Cancel { tag: 12345 }), Status::NoEnt);
}

#[test]
fn vring_stop_cancels_that_queues_waiters_and_keeps_state() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    let (c3, _) = d.ctx(0);
    d.lock(0, c1, o);
    let (t2, r) = d.submit_on(0, 2, Dev::lock_req(c2, o));
    assert!(r.is_none());
    let (t3, r) = d.submit_on(0, 0, Dev::lock_req(c3, o));
    assert!(r.is_none());
    let now = d.now;
    d.ex.cancel_queue(0, 2, now);
    let done = d.completions();
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].origin.token, done[0].response.clone()),
        (t2, Err(Status::Canceled))
    );
    d.unlock(0, c1, o);
    assert_eq!(
        d.completed(t3),
        Some(Ok(Reply::Empty)),
        "the other queue's waiter is granted"
    );
}
