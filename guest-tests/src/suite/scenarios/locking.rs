// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reservation lock (section 7.4): contention, wait-die with two,
//! three and four contexts, the order waiters are granted in, `CANCEL`,
//! and waiting requests that never hold up other queues.

use virtio_dmabuf_protocol::{lock_flags, Reply, Request, Status, CONTROLQ};

use super::{create, parked_lock, Check, Target, SETTLE};
use crate::driver::lock_request;
use crate::session::Session;
use crate::{ensure, ensure_eq, skip};

/// Three contexts in a cycle, each holding one lock and wanting the next:
/// A (oldest) holds X and wants Y, B holds Y and wants Z, C (youngest)
/// holds Z and wants X. A and B wait (each is older than the holder it
/// waits for); C dies at once with `EDEADLK`, backs off by unlocking
/// everything, and B then A complete. C relocks the contended object
/// with `SLOW` (holding nothing, it waits without dying) and is granted
/// it when A lets go, then takes the rest of its set.
pub(super) fn three_contexts_resolve_by_wait_die(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    // Spread the waiting requests over the request queues there are.
    let queues = d.request_queues();
    let q2 = queues
        .iter()
        .copied()
        .find(|&q| q != CONTROLQ)
        .unwrap_or(CONTROLQ);
    let (x, y, z) = (create(d, 1, 0)?, create(d, 1, 0)?, create(d, 1, 0)?);
    let (a, sa) = d.acquire_init()??;
    let (b, sb) = d.acquire_init()??;
    let (c, sc) = d.acquire_init()??;
    ensure!(sa < sb && sb < sc, "stamps {sa}, {sb}, {sc}");
    ensure_eq!(d.lock(a, x, 0)?, Ok(()));
    ensure_eq!(d.lock(b, y, 0)?, Ok(()));
    ensure_eq!(d.lock(c, z, 0)?, Ok(()));

    let a_wants_y = d.submit(CONTROLQ, &lock_request(a, y, 0))?;
    ensure!(
        !d.settle(&a_wants_y, SETTLE)?,
        "A is older than Y's holder: it waits"
    );
    let b_wants_z = d.submit(q2, &lock_request(b, z, 0))?;
    ensure!(
        !d.settle(&b_wants_z, SETTLE)?,
        "B is older than Z's holder: it waits"
    );
    ensure_eq!(
        d.lock(c, x, 0)?,
        Err(Status::Deadlk),
        "C holds Z and is younger than X's holder: it dies"
    );
    ensure!(
        !d.poll(&a_wants_y)? && !d.poll(&b_wants_z)?,
        "nobody moved yet"
    );

    // C backs off: everything it holds goes.
    ensure_eq!(d.unlock(c, z)?, Ok(()));
    ensure_eq!(d.complete(b_wants_z)?, Ok(Reply::Empty), "B gets Z");
    ensure!(!d.poll(&a_wants_y)?, "A still waits for Y, which B holds");
    // C waits for the contended lock, holding nothing.
    let c_slow = d.submit(q2, &lock_request(c, x, lock_flags::SLOW))?;
    ensure!(!d.settle(&c_slow, SETTLE)?, "SLOW waits while A holds X");
    // B is done.
    ensure_eq!(d.unlock(b, z)?, Ok(()));
    ensure_eq!(d.unlock(b, y)?, Ok(()));
    ensure_eq!(d.complete(a_wants_y)?, Ok(Reply::Empty), "A gets Y");
    ensure!(!d.poll(&c_slow)?, "X is still A's");
    // A is done.
    ensure_eq!(d.unlock(a, y)?, Ok(()));
    ensure_eq!(d.unlock(a, x)?, Ok(()));
    ensure_eq!(d.complete(c_slow)?, Ok(Reply::Empty), "C gets X");
    // C takes the rest of its set.
    ensure_eq!(d.lock(c, z, 0)?, Ok(()));
    ensure_eq!(d.lock(c, y, 0)?, Ok(()));
    for o in [x, y, z] {
        ensure_eq!(d.unlock(c, o)?, Ok(()));
    }
    for ctx in [a, b, c] {
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    for o in [x, y, z] {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

/// How long a request is watched to tell that it waits.
const PARKED: std::time::Duration = std::time::Duration::from_millis(100);

/// The die rule applies again whenever a waiter's queue changes: B holds
/// Y and waits for X, held by the younger C; when the older A queues for
/// X, it goes ahead of B, and B's waiting `LOCK` ends with `EDEADLK` at
/// once. A is granted X when C lets go; B, backed off, gets it with SLOW.
pub(super) fn waiting_younger_context_with_locks_dies_when_an_older_one_queues(
    t: &Target,
) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let (x, y) = (create(d, 1, 0)?, create(d, 1, 0)?);
    let (a, _) = d.acquire_init()??;
    let (b, _) = d.acquire_init()??;
    let (c, _) = d.acquire_init()??;
    ensure_eq!(d.lock(c, x, 0)?, Ok(()));
    ensure_eq!(d.lock(b, y, 0)?, Ok(()));
    let b_wants_x = d.submit(CONTROLQ, &lock_request(b, x, 0))?;
    ensure!(
        !d.settle(&b_wants_x, PARKED)?,
        "B is older than X's holder: it waits"
    );
    let a_wants_x = d.submit(CONTROLQ, &lock_request(a, x, 0))?;
    ensure_eq!(
        d.complete(b_wants_x)?,
        Err(Status::Deadlk),
        "an older context queued ahead of B, which holds a lock"
    );
    ensure!(!d.poll(&a_wants_x)?, "A waits for C");
    ensure_eq!(d.unlock(b, y)?, Ok(()));
    let b_slow = d.submit(CONTROLQ, &lock_request(b, x, lock_flags::SLOW))?;
    ensure_eq!(d.unlock(c, x)?, Ok(()));
    ensure_eq!(
        d.complete(a_wants_x)?,
        Ok(Reply::Empty),
        "A first: it is older"
    );
    ensure!(!d.settle(&b_slow, PARKED)?, "B waits for A");
    ensure_eq!(d.unlock(a, x)?, Ok(()));
    ensure_eq!(d.complete(b_slow)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(b, x)?, Ok(()));
    for ctx in [a, b, c] {
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    for o in [x, y] {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

/// Waiting contexts are granted oldest stamp first, whatever order they
/// queued in; contexts that hold nothing never die.
pub(super) fn waiting_contexts_are_granted_oldest_stamp_first(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let x = create(d, 1, 0)?;
    let mut contexts = Vec::new();
    for _ in 0..4 {
        contexts.push(d.acquire_init()??.0);
    }
    // The youngest holds X; the others queue youngest first.
    let holder = contexts[3];
    ensure_eq!(d.lock(holder, x, 0)?, Ok(()));
    let mut waiting = Vec::new();
    for &ctx in contexts[..3].iter().rev() {
        let w = d.submit(CONTROLQ, &lock_request(ctx, x, 0))?;
        ensure!(!d.settle(&w, PARKED)?, "a LOCK of a held object waits");
        waiting.push((ctx, w));
    }
    let mut previous = holder;
    // Oldest first: contexts[0], then [1], then [2].
    while let Some((ctx, w)) = waiting.pop() {
        ensure_eq!(d.unlock(previous, x)?, Ok(()));
        ensure_eq!(
            d.complete(w)?,
            Ok(Reply::Empty),
            "the oldest waiter is granted"
        );
        for (_, other) in &waiting {
            ensure!(!d.poll(other)?, "only one waiter is granted at a time");
        }
        previous = ctx;
    }
    ensure_eq!(d.unlock(previous, x)?, Ok(()));
    for ctx in contexts {
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    ensure_eq!(d.release(x)?, Ok(()));
    Ok(())
}

pub(super) fn lock_contention_parks_until_unlock(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let (a, _) = d.acquire_init()??;
    let (b, _) = d.acquire_init()??;
    let (c, _) = d.acquire_init()??;
    ensure_eq!(d.lock(a, object, 0)?, Ok(()));
    ensure_eq!(d.lock(a, object, 0)?, Err(Status::Already));
    ensure_eq!(d.lock(c, object, lock_flags::TRY)?, Err(Status::Busy));
    ensure_eq!(d.unlock(c, object)?, Err(Status::Perm));
    let parked = d.submit(CONTROLQ, &lock_request(b, object, 0))?;
    ensure!(
        !d.settle(&parked, SETTLE)?,
        "LOCK on a held object must wait"
    );
    // The context has a waiting request: anything else naming it is EBUSY.
    ensure_eq!(d.lock(b, object, lock_flags::TRY)?, Err(Status::Busy));
    ensure_eq!(
        d.acquire_fini(a)?,
        Err(Status::Busy),
        "FINI while holding a lock"
    );
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(b, object)?, Ok(()));
    for ctx in [a, b, c] {
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn wait_die_backoff_and_slow_relock_with_two_contexts(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let x = create(d, 1, 0)?;
    let y = create(d, 1, 0)?;
    let (old, s_old) = d.acquire_init()??;
    let (young, s_young) = d.acquire_init()??;
    ensure!(s_old < s_young, "stamps grow: {s_old} then {s_young}");
    ensure_eq!(d.lock(old, x, 0)?, Ok(()));
    ensure_eq!(d.lock(young, y, 0)?, Ok(()));
    // Younger, holding a lock, contends with an older holder: dies at once.
    ensure_eq!(d.lock(young, x, 0)?, Err(Status::Deadlk));
    // SLOW while holding a lock is EINVAL.
    ensure_eq!(d.lock(young, x, lock_flags::SLOW)?, Err(Status::Inval));
    // Older contends with the younger holder: waits.
    let parked = d.submit(CONTROLQ, &lock_request(old, y, 0))?;
    ensure!(!d.settle(&parked, SETTLE)?, "the older context must wait");
    // The younger backs off; the older gets Y.
    ensure_eq!(d.unlock(young, y)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    // Holding nothing, SLOW waits like a plain LOCK.
    let slow = d.submit(CONTROLQ, &lock_request(young, x, lock_flags::SLOW))?;
    ensure!(!d.settle(&slow, SETTLE)?);
    ensure_eq!(d.unlock(old, x)?, Ok(()));
    ensure_eq!(d.complete(slow)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(young, x)?, Ok(()));
    ensure_eq!(d.unlock(old, y)?, Ok(()));
    ensure_eq!(d.acquire_fini(old)?, Ok(()));
    ensure_eq!(d.acquire_fini(young)?, Ok(()));
    ensure_eq!(d.release(x)?, Ok(()));
    ensure_eq!(d.release(y)?, Ok(()));
    Ok(())
}

pub(super) fn cancel_ends_the_waiting_request_with_that_tag(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let (object, a, b, parked) = parked_lock(d)?;
    let tag = parked.tag();
    ensure_eq!(d.cancel(tag)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    ensure_eq!(d.cancel(tag)?, Err(Status::NoEnt));
    // ACQUIRE_FINI ends a context's waiting request too.
    let parked = d.submit(CONTROLQ, &lock_request(b, object, 0))?;
    ensure!(!d.settle(&parked, SETTLE)?);
    ensure_eq!(d.acquire_fini(b)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.acquire_fini(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn parked_request_does_not_block_other_queues(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let queues = d.request_queues();
    let Some(&other) = queues.iter().find(|&&q| q != CONTROLQ) else {
        skip!("the daemon has one request queue (--queues 1)")
    };
    let (object, a, b, parked) = parked_lock(d)?;
    for &q in &queues {
        ensure!(
            d.call_on(q, &Request::GetInfo)?.is_ok(),
            "queue {q} serves while queue 0 has a parked LOCK"
        );
    }
    // The UNLOCK on another queue completes the LOCK on the controlq.
    ensure_eq!(
        d.call_on(other, &Request::Unlock { ctx: a, object })?,
        Ok(Reply::Empty)
    );
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    ensure_eq!(
        d.call_on(other, &Request::Unlock { ctx: b, object })?,
        Ok(Reply::Empty)
    );
    ensure_eq!(d.acquire_fini(a)?, Ok(()));
    ensure_eq!(d.acquire_fini(b)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}
