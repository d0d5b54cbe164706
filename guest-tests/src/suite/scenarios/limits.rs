// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Quotas and timeouts: what keeps one guest from holding the device or
//! another guest hostage (sections 5, 7.1, 7.5, 7.6).

use std::time::{Duration, Instant};

use virtio_dmabuf_protocol::{Direction, FenceUsage, Info, Reply, Request, Status, CONTROLQ};

use super::{create, info, page, Check, Quotas, Stop, Target, SETTLE};
use crate::driver::{begin_cpu_access_request, Driver};
use crate::{ensure, ensure_eq, skip};

const USAGES: [FenceUsage; 4] = [
    FenceUsage::Kernel,
    FenceUsage::Write,
    FenceUsage::Read,
    FenceUsage::Bookkeep,
];

fn wait_request(object: u64, usage: FenceUsage, timeout: Duration) -> Request {
    Request::Wait {
        object,
        usage,
        timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
    }
}

/// A fence of `usage` on `object`, attached under a fresh context that
/// then unlocks (the fence stays). Returns `(ctx, fence)`.
fn fence_on(d: &Driver, object: u64, usage: FenceUsage) -> Result<(u64, u64), Stop> {
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let fence = d.fence_attach(ctx, object, usage)??;
    ensure_eq!(d.unlock(ctx, object)?, Ok(()));
    Ok((ctx, fence))
}

pub(super) fn wait_times_out_with_etimedout(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let (ctx, fence) = fence_on(d, object, FenceUsage::Read)?;
    // timeout 0 polls: the answer now, whichever it is.
    ensure_eq!(
        d.wait(object, FenceUsage::Write, 0)?,
        Ok(()),
        "no fence <= WRITE"
    );
    ensure_eq!(d.wait(object, FenceUsage::Read, 0)?, Err(Status::TimedOut));
    ensure_eq!(
        d.wait(object, FenceUsage::Bookkeep, 0)?,
        Err(Status::TimedOut)
    );
    // A small timeout on a fence nobody signals: ETIMEDOUT, not before.
    let timeout = Duration::from_millis(50);
    let start = Instant::now();
    let r = d.complete(d.submit(CONTROLQ, &wait_request(object, FenceUsage::Read, timeout))?)?;
    let took = start.elapsed();
    ensure_eq!(r, Err(Status::TimedOut));
    ensure!(
        took >= timeout,
        "WAIT of {timeout:?} answered after {took:?}"
    );
    // The WAIT timing out did nothing to the fence.
    ensure_eq!(
        d.wait(object, FenceUsage::Bookkeep, 0)?,
        Err(Status::TimedOut)
    );
    // Implicit sync of CPU access (section 7.5): reading waits for fences
    // <= WRITE only, writing for fences <= READ.
    ensure_eq!(d.begin_cpu_access(object, Direction::FromDevice)?, Ok(()));
    ensure_eq!(d.end_cpu_access(object, Direction::FromDevice)?, Ok(()));
    let writer = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(object, Direction::ToDevice),
    )?;
    ensure!(
        !d.settle(&writer, SETTLE)?,
        "BEGIN(TO_DEVICE) waits for a READ fence"
    );
    let waiting = d.submit(
        CONTROLQ,
        &wait_request(object, FenceUsage::Read, Duration::from_secs(3)),
    )?;
    ensure!(!d.settle(&waiting, Duration::from_millis(20))?);
    ensure_eq!(d.fence_signal(fence, 0)?, Ok(()));
    ensure_eq!(d.complete(writer)?, Ok(Reply::Empty));
    ensure_eq!(
        d.complete(waiting)?,
        Ok(Reply::Empty),
        "signalled before its timeout"
    );
    ensure_eq!(d.end_cpu_access(object, Direction::ToDevice)?, Ok(()));
    for usage in USAGES {
        ensure_eq!(
            d.wait(object, usage, 0)?,
            Ok(()),
            "{usage:?} after the signal"
        );
    }
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn unsignalled_fence_times_out_after_fence_timeout(t: &Target) -> Check {
    let Some(limit) = t.daemon.fence_timeout else {
        skip!("the suite does not know the daemon's --fence-timeout")
    };
    if limit > Duration::from_secs(2) {
        skip!("the daemon's --fence-timeout is {limit:?}; the scenario needs at most 2 s");
    }
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let start = Instant::now();
    let (ctx, fence) = fence_on(d, object, FenceUsage::Write)?;
    // A reader parks on the fence its producer never signals, until the
    // device times the fence out, as a GPU scheduler does. How long it
    // waited proves that it parked (a check that it is still parked after
    // a while would race the timeout on a busy machine).
    let reader = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(object, Direction::FromDevice),
    )?;
    let r = d.complete_within(reader, limit + Duration::from_secs(5))?;
    let took = start.elapsed();
    ensure_eq!(r, Ok(Reply::Empty));
    ensure!(
        took >= limit,
        "BEGIN_CPU_ACCESS(FROM_DEVICE) ended after {took:?}: it must wait for the WRITE fence, timed out after {limit:?}"
    );
    ensure_eq!(d.end_cpu_access(object, Direction::FromDevice)?, Ok(()));
    for usage in USAGES {
        ensure_eq!(
            d.wait(object, usage, 0)?,
            Ok(()),
            "{usage:?}: no fence left"
        );
    }
    let late = d.fence_signal(fence, 0)?;
    ensure!(
        late == Err(Status::TimedOut) || late == Err(Status::NoEnt),
        "signalling a fence the device timed out: {late:?}"
    );
    // A WAIT parked on a hung fence completes (OK: WAIT does not report a
    // fence's error) when the device times it out, within its own timeout.
    let start = Instant::now();
    let (ctx2, _) = fence_on(d, object, FenceUsage::Kernel)?;
    let r = d.complete_within(
        d.submit(
            CONTROLQ,
            &wait_request(object, FenceUsage::Kernel, limit * 10),
        )?,
        limit * 10 + Duration::from_secs(5),
    )?;
    ensure_eq!(r, Ok(Reply::Empty));
    ensure!(start.elapsed() >= limit);
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx2)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

/// Every quota can be exhausted at exactly the number `GET_INFO` reports,
/// with `ENOSPC`, and is whole again once the guest lets go.
pub(super) fn quotas_are_enospc_and_reported_by_get_info(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let i = info(d)?;
    let q = Quotas::of(&i);
    if let Some(configured) = t.daemon.quotas {
        ensure_eq!(q, configured, "GET_INFO reports the daemon's quotas");
    }
    let pg = page(d)?;
    let small = [
        q.max_objects,
        q.max_attachments,
        q.max_contexts,
        q.max_fences,
        q.max_waiting,
    ]
    .iter()
    .all(|&n| (1..=16).contains(&n))
        && q.max_bytes <= 64 * pg
        && u64::from(q.max_objects) * pg <= q.max_bytes;
    if !small {
        skip!("the quotas are too large to exhaust here: {q:?}");
    }
    host_bytes(d, &i, pg)?;
    // Objects.
    let mut objects = Vec::new();
    for _ in 0..q.max_objects {
        objects.push(create(d, 1, 0)?);
    }
    ensure_eq!(
        d.create(pg, 0)?.map(|o| o.object),
        Err(Status::NoSpc),
        "objects"
    );
    // Resources are checked last (section 4): earlier failures win.
    ensure_eq!(d.create(pg + 1, 0)?.map(|o| o.object), Err(Status::Inval));
    if let Some(host) = &t.host {
        let name = super::export_name("quota");
        let file = crate::vmm::shm::memfd_with("quota", &vec![0u8; pg as usize])
            .map_err(|e| Stop::Fail(e.to_string()))?;
        host.export(&name, std::os::fd::AsFd::as_fd(&file), &Default::default())
            .map_err(Stop::Fail)?;
        let opened = d.open_by_name(&name)?.map(|o| o.object);
        host.revoke(&name).map_err(Stop::Fail)?;
        ensure_eq!(opened, Err(Status::NoSpc), "OPEN of a new object counts");
    }
    let object = objects.remove(0);
    for o in objects {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    // Attachments.
    let mut attachments = Vec::new();
    for _ in 0..q.max_attachments {
        attachments.push(d.attach(object, 0)??);
    }
    ensure_eq!(d.attach(object, 0)?, Err(Status::NoSpc), "attachments");
    ensure_eq!(d.attach(u64::MAX, 0)?, Err(Status::NoEnt), "handles first");
    for a in attachments {
        ensure_eq!(d.detach(a)?, Ok(()));
    }
    // Contexts.
    let mut contexts = Vec::new();
    for _ in 0..q.max_contexts {
        contexts.push(d.acquire_init()??.0);
    }
    ensure_eq!(d.acquire_init()?, Err(Status::NoSpc), "contexts");
    let ctx = contexts[0];
    // Fences.
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let mut fences = Vec::new();
    for _ in 0..q.max_fences {
        fences.push(d.fence_attach(ctx, object, FenceUsage::Write)??);
    }
    ensure_eq!(
        d.fence_attach(ctx, object, FenceUsage::Write)?,
        Err(Status::NoSpc),
        "fences"
    );
    ensure_eq!(d.unlock(ctx, object)?, Ok(()));
    ensure_eq!(
        d.fence_attach(ctx, object, FenceUsage::Write)?,
        Err(Status::Perm),
        "the lock is checked before the quota"
    );
    // Waiting requests: any request that would park is refused once
    // max_waiting of the guest's requests wait; the others are served.
    let mut waiting = Vec::new();
    for _ in 0..q.max_waiting {
        let w = d.submit(
            CONTROLQ,
            &wait_request(object, FenceUsage::Write, Duration::from_secs(4)),
        )?;
        ensure!(
            !d.settle(&w, Duration::from_millis(20))?,
            "a WAIT on a pending fence parks"
        );
        waiting.push(w);
    }
    ensure_eq!(
        d.wait(object, FenceUsage::Write, 1_000_000_000)?,
        Err(Status::NoSpc),
        "waiting requests"
    );
    ensure_eq!(
        d.begin_cpu_access(object, Direction::FromDevice)?,
        Err(Status::NoSpc),
        "waiting requests"
    );
    ensure_eq!(
        d.wait(u64::MAX, FenceUsage::Write, 1_000_000_000)?,
        Err(Status::NoEnt),
        "handles first"
    );
    ensure_eq!(
        d.wait(object, FenceUsage::Kernel, 0)?,
        Ok(()),
        "no wait needed"
    );
    for f in fences {
        ensure_eq!(d.fence_signal(f, 0)?, Ok(()));
    }
    for w in waiting {
        ensure_eq!(d.complete(w)?, Ok(Reply::Empty));
    }
    // Whole again.
    for c in contexts {
        ensure_eq!(d.acquire_fini(c)?, Ok(()));
    }
    let (c, _) = d.acquire_init()??;
    ensure_eq!(d.acquire_fini(c)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    let mut again = Vec::new();
    for _ in 0..q.max_objects {
        again.push(create(d, 1, 0)?);
    }
    for o in again {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

/// `max_bytes`: host memory of the objects the guest created.
fn host_bytes(d: &Driver, i: &Info, pg: u64) -> Check {
    let fits = i.max_bytes / pg * pg;
    if fits == 0 || fits + pg > i.max_object_size {
        return Ok(());
    }
    ensure_eq!(
        d.create(fits + pg, 0)?.map(|o| o.object),
        Err(Status::NoSpc),
        "one object larger than max_bytes"
    );
    let big = d.create(fits, 0)??;
    if i.max_objects >= 2 {
        ensure_eq!(
            d.create(pg, 0)?.map(|o| o.object),
            Err(Status::NoSpc),
            "max_bytes spent"
        );
    }
    ensure_eq!(d.release(big.object)?, Ok(()));
    Ok(())
}
