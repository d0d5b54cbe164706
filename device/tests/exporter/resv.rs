// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Wait-die between acquire contexts (contract section 7.4;
//! `src/exporter/resv.rs`).

use super::helpers::*;

#[test]
fn younger_context_holding_a_lock_gets_edeadlk_at_once() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    d.lock(0, young, b);
    assert_eq!(d.err(0, Dev::lock_req(young, a)), Status::Deadlk);
    // The older one waits for the younger instead.
    let t = d.park(0, Dev::lock_req(old, b));
    d.unlock(0, young, b);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
}

#[test]
fn context_holding_no_lock_waits_and_never_gets_edeadlk() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    let t = d.park(0, Dev::lock_req(young, a));
    d.unlock(0, old, a);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
}

#[test]
fn waiting_contexts_are_granted_oldest_stamp_first() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (holder, _) = d.ctx(0);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, holder, a);
    let t2 = d.park(0, Dev::lock_req(c2, a));
    let t1 = d.park(0, Dev::lock_req(c1, a));
    d.unlock(0, holder, a);
    assert_eq!(d.completed(t1), Some(Ok(Reply::Empty)), "older first");
    d.unlock(0, c1, a);
    assert_eq!(d.completed(t2), Some(Ok(Reply::Empty)));
}

#[test]
fn waiting_younger_context_with_locks_dies_when_an_older_one_queues() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let c = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (mid, _) = d.ctx(0);
    let (holder, _) = d.ctx(0);
    let (x, _) = d.ctx(1);
    let _ = x;
    // The holder is the youngest, so `mid` (holding b) may wait for it.
    d.lock(0, holder, a);
    d.lock(0, mid, b);
    let tm = d.park(0, Dev::lock_req(mid, a));
    d.lock(0, old, c);
    // An older context with a lock queues ahead: mid must back off now.
    let to = d.park(0, Dev::lock_req(old, a));
    assert_eq!(d.completed(tm), Some(Err(Status::Deadlk)));
    d.unlock(0, holder, a);
    assert_eq!(d.completed(to), Some(Ok(Reply::Empty)));
}

#[test]
fn wait_die_backoff_and_slow_relock_with_two_contexts() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    d.lock(0, young, b);
    let t_old = d.park(0, Dev::lock_req(old, b));
    assert_eq!(d.err(0, Dev::lock_req(young, a)), Status::Deadlk);
    // Back off: drop everything, then SLOW on the contended object.
    d.unlock(0, young, b);
    assert_eq!(d.completed(t_old), Some(Ok(Reply::Empty)));
    let t_slow = d.park(
        0,
        Request::Lock {
            ctx: young,
            object: a,
            try_lock: false,
            slow: true,
        },
    );
    d.unlock(0, old, a);
    d.unlock(0, old, b);
    assert_eq!(d.completed(t_slow), Some(Ok(Reply::Empty)));
    d.lock(0, young, b);
}

#[test]
fn three_contexts_resolve_by_wait_die() {
    let mut d = Dev::new();
    let objs: Vec<u64> = (0..3).map(|_| d.create(0, 1, false, false)).collect();
    let ctxs: Vec<u64> = (0..3).map(|_| d.ctx(0).0).collect();
    // Each holds its own object and wants the next one: a cycle.
    for i in 0..3 {
        d.lock(0, ctxs[i], objs[i]);
    }
    let t0 = d.park(0, Dev::lock_req(ctxs[0], objs[1]));
    let t1 = d.park(0, Dev::lock_req(ctxs[1], objs[2]));
    assert_eq!(
        d.err(0, Dev::lock_req(ctxs[2], objs[0])),
        Status::Deadlk,
        "the youngest dies"
    );
    d.unlock(0, ctxs[2], objs[2]);
    assert_eq!(d.completed(t1), Some(Ok(Reply::Empty)));
    d.unlock(0, ctxs[1], objs[1]);
    d.unlock(0, ctxs[1], objs[2]);
    assert_eq!(d.completed(t0), Some(Ok(Reply::Empty)));
}
