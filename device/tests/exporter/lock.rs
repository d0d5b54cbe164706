// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Acquire contexts, LOCK/UNLOCK and their quotas (contract section 7.4;
//! `src/exporter/lock.rs`).

use super::helpers::*;

#[test]
fn stamps_come_from_one_counter_shared_by_all_guests() {
    let mut d = Dev::new();
    let (_, s1) = d.ctx(0);
    let (_, s2) = d.ctx(1);
    let (_, s3) = d.ctx(0);
    assert!(s1 < s2 && s2 < s3);
}

#[test]
fn lock_free_is_granted_and_held_by_self_is_ealready() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, stamp) = d.ctx(0);
    d.lock(0, ctx, o);
    assert_eq!(d.err(0, Dev::lock_req(ctx, o)), Status::Already);
    let holder = d.ex.list()[0].lock_holder.clone().unwrap();
    assert_eq!((holder.guest, holder.stamp), (Some(0), Some(stamp)));
}

#[test]
fn try_lock_held_by_another_is_ebusy_at_once() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, o);
    assert_eq!(
        d.err(
            0,
            Request::Lock {
                ctx: c2,
                object: o,
                try_lock: true,
                slow: false
            }
        ),
        Status::Busy
    );
}

#[test]
fn slow_lock_while_holding_any_lock_is_einval() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, a);
    assert_eq!(
        d.err(
            0,
            Request::Lock {
                ctx,
                object: b,
                try_lock: false,
                slow: true
            }
        ),
        Status::Inval
    );
}

#[test]
fn contexts_belong_to_the_guest_that_made_them() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (foreign, _) = d.ctx(1);
    assert_eq!(d.err(0, Dev::lock_req(foreign, a)), Status::NoEnt);
    assert_eq!(
        d.err(1, Dev::lock_req(foreign, a)),
        Status::NoEnt,
        "and objects to theirs"
    );
}

#[test]
fn second_request_naming_a_waiting_context_is_ebusy() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    d.park(0, Dev::lock_req(c2, a));
    assert_eq!(d.err(0, Dev::lock_req(c2, b)), Status::Busy);
}

#[test]
fn unlock_of_a_lock_not_held_is_eperm() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    assert_eq!(
        d.err(0, Request::Unlock { ctx: c2, object: a }),
        Status::Perm
    );
}

#[test]
fn acquire_fini_is_ebusy_while_holding_and_cancels_its_waiter() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    assert_eq!(d.err(0, Request::AcquireFini { ctx: c1 }), Status::Busy);
    let t = d.park(0, Dev::lock_req(c2, a));
    d.ok(0, Request::AcquireFini { ctx: c2 });
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
    assert_eq!(d.err(0, Dev::lock_req(c2, a)), Status::NoEnt);
}

#[test]
fn context_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_contexts: 1,
        ..Limits::default()
    });
    d.ctx(0);
    assert_eq!(d.err(0, Request::AcquireInit), Status::NoSpc);
}

#[test]
fn waiting_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_waiting: 1,
        ..Limits::default()
    });
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    let (c3, _) = d.ctx(0);
    d.lock(0, c1, a);
    d.park(0, Dev::lock_req(c2, a));
    assert_eq!(d.err(0, Dev::lock_req(c3, a)), Status::NoSpc);
}
