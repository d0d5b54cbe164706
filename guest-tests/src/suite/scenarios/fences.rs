// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fences (section 7.6): `WAIT` parks until every fence it waits for is
//! signalled.

use virtio_dmabuf_protocol::{caps, FenceUsage, Reply, Request, Status, CONTROLQ};

use super::{create, need_cap, Check, Target, SETTLE};
use crate::session::Session;
use crate::{ensure, ensure_eq};

pub(super) fn wait_completes_when_every_fence_up_to_usage_is_signalled(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::FENCES, "FENCES", false)?;
    let object = create(d, 1, 0)?;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(
        d.fence_attach(ctx, object, FenceUsage::Write)?,
        Err(Status::Perm),
        "needs the lock"
    );
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let fence = d.fence_attach(ctx, object, FenceUsage::Write)??;
    ensure_eq!(
        d.wait(object, FenceUsage::Write, 0)?,
        Err(Status::TimedOut),
        "poll"
    );
    ensure_eq!(
        d.wait(object, FenceUsage::Kernel, 0)?,
        Ok(()),
        "no KERNEL fence"
    );
    let waiting = d.submit(
        CONTROLQ,
        &Request::Wait {
            object,
            usage: FenceUsage::Read,
            timeout_ns: 3_000_000_000,
        },
    )?;
    ensure!(!d.settle(&waiting, SETTLE)?);
    ensure_eq!(d.fence_signal(fence, 0)?, Ok(()));
    ensure_eq!(d.complete(waiting)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(ctx, object)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

/// A `TRANSFER` that meets an unsignalled fence waits for it (a CPU access
/// waits for the fences of its direction) and then copies what the chain
/// held: the daemon copies a transfer that can run at once straight
/// between the chain and the object, and one that waits from a copy of
/// its data taken before it parked.
pub(super) fn transfers_wait_for_fences_then_copy(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::FENCES, "FENCES", false)?;
    let object = create(d, 1, 0)?;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 1) as u8).collect();

    let fence = d.fence_attach(ctx, object, FenceUsage::Write)??;
    let to_host = d.submit(
        CONTROLQ,
        &Request::TransferToHost {
            object,
            offset: 100,
            data: data.clone(),
        },
    )?;
    ensure!(!d.settle(&to_host, SETTLE)?, "TRANSFER_TO_HOST waits");
    ensure_eq!(d.fence_signal(fence, 0)?, Ok(()));
    ensure_eq!(d.complete(to_host)?, Ok(Reply::Empty));

    let fence = d.fence_attach(ctx, object, FenceUsage::Write)??;
    let from_host = d.submit(
        CONTROLQ,
        &Request::TransferFromHost {
            object,
            offset: 100,
            len: data.len() as u64,
        },
    )?;
    ensure!(!d.settle(&from_host, SETTLE)?, "TRANSFER_FROM_HOST waits");
    ensure_eq!(d.fence_signal(fence, 0)?, Ok(()));
    ensure_eq!(d.complete(from_host)?, Ok(Reply::Data(data.clone())));

    // With every fence signalled, both run at once.
    ensure_eq!(d.transfer_to_host(object, 0, &data[..50])?, Ok(()));
    ensure_eq!(
        d.transfer_from_host(object, 0, 50)?,
        Ok(data[..50].to_vec())
    );
    ensure_eq!(d.unlock(ctx, object)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}
