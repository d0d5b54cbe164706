// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host exports, eviction and revoke (contract sections 8, 10 and 11;
//! `src/exporter/host.rs`).

use super::helpers::*;

#[test]
fn evict_moves_bytes_bumps_generation_and_notifies_dynamic_importers() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    d.ok(
        0,
        Request::TransferToHost {
            object: o,
            offset: 10,
            data: b"hello".to_vec(),
        },
    );
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let m = d.map(0, a, Bidi, ctx);
    assert_eq!((m.generation, m.map_flags & map_flags::PINNED), (0, 0));
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    let e = d.ex.pop_event(0).unwrap();
    assert_eq!(
        (e.kind, e.object, e.attachment, e.data),
        (EventType::MoveNotify, o, a, 1)
    );
    let mark = d.sync_mark();
    d.unmap(0, m.mapping);
    assert!(
        d.syncs_since(mark).is_empty(),
        "an invalidated mapping unmaps with no sync"
    );
    assert_eq!(d.map(0, a, Bidi, 0).generation, 1);
    assert_eq!(
        d.ok(
            0,
            Request::TransferFromHost {
                object: o,
                offset: 10,
                len: 5
            }
        ),
        Reply::Data(b"hello".to_vec())
    );
}

#[test]
fn evict_keeps_the_window_offset() {
    let mut d = Dev::new();
    let pad = d.create(0, 1, false, false);
    d.ok(0, Dev::map_shm_req(pad, false));
    let o = d.create(0, 1, true, false);
    let Reply::Shm { shm_offset, .. } = d.ok(0, Dev::map_shm_req(o, true)) else {
        panic!()
    };
    let u = uuid_of(&d, 1);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    let log = d.fe[0].lock().unwrap();
    assert_eq!(log.shm_unmaps.last(), Some(&(shm_offset, PAGE)));
    assert_eq!(log.shm_maps.last(), Some(&(shm_offset, PAGE, true)));
}

#[test]
fn evict_of_static_exporter_is_refused() {
    let mut d = Dev::new();
    d.create(0, 1, false, false);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Err(HostError::NotDynamic)));
}

#[test]
fn evict_waits_for_the_lock_and_gives_up_after_its_timeout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let u = uuid_of(&d, 0);
    let now = d.now;
    assert_eq!(d.ex.host_evict(u, 7, Duration::from_millis(100), now), None);
    d.advance(Duration::from_millis(150));
    assert_eq!(
        d.ex.take_host_completions(),
        vec![(7, Err(HostError::LockTimeout))]
    );
    // A second try gets the lock once it is released, as a context-less waiter.
    assert_eq!(d.evict(u, 8), None);
    d.unlock(0, ctx, o);
    assert_eq!(d.ex.take_host_completions(), vec![(8, Ok(()))]);
}

#[test]
fn evict_waits_for_every_fence_before_moving() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    assert!(
        d.ex.list()[0].lock_holder.is_some(),
        "the mover holds the lock while it waits"
    );
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(d.ex.take_host_completions(), vec![(1, Ok(()))]);
    assert_eq!(d.ex.list()[0].generation, 1);
}

#[test]
fn revoke_fails_handles_cancels_waiters_drops_locks_and_sends_revoked() {
    let mut d = Dev::new();
    export(&mut d, "cam", 1, false, false, None);
    let h = handle(open_name(&mut d, 0, "cam").unwrap());
    let a = d.attach(0, h, false);
    let m = d.map(0, a, Bidi, 0);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, h);
    let t = d.park(0, Dev::lock_req(c2, h));
    d.ok(0, Dev::map_shm_req(h, false));
    let now = d.now;
    d.ex.host_revoke("cam", now).unwrap();
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
    let e = d.ex.pop_event(0).unwrap();
    assert_eq!((e.kind, e.object), (EventType::Revoked, h));
    assert_eq!(
        d.err(
            0,
            Request::BeginCpuAccess {
                object: h,
                dir: Bidi
            }
        ),
        Status::NoEnt
    );
    assert_eq!(d.err(0, Dev::lock_req(c2, h)), Status::NoEnt);
    assert_eq!(
        d.fe[0].lock().unwrap().shm_unmaps.len(),
        1,
        "window mapping gone"
    );
    d.unmap(0, m.mapping);
    d.ok(0, Request::AcquireFini { ctx: c1 });
    assert_eq!(open_name(&mut d, 1, "cam"), Err(Status::NoEnt));
}

/// Section 10: the eviction timeout bounds the wait for the lock only; once
/// the mover holds it and waits for fences (section 8), that timer is
/// spent and must not stay due (the timer thread would spin on it).
#[test]
fn evict_lock_timeout_is_no_timer_once_the_mover_holds_the_lock() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    d.advance(Duration::from_secs(2));
    assert!(d.ex.take_host_completions().is_empty());
    let next = d.ex.next_deadline().expect("the fence timeout is pending");
    assert!(next > d.now, "a spent timer is still due: {next:?}");
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(d.ex.take_host_completions(), vec![(1, Ok(()))]);
}

/// Section 6 (a reset releases everything, waiting requests included) and
/// section 10 (eviction ends with a clear result): a move waiting on an
/// object that dies must end, not wait forever holding a dead lock.
#[test]
fn object_death_ends_a_waiting_eviction() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    d.ok(0, Request::ResetSession);
    assert_eq!(d.object_count(), 0);
    assert_eq!(
        d.ex.take_host_completions(),
        vec![(1, Err(HostError::Canceled))]
    );
    assert_eq!(d.ex.next_deadline(), None);
}
