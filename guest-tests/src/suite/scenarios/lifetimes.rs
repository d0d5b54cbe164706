// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Lifetimes (section 6): a vring stop, a session reset, a device reset
//! and a reconnect, and the state a front-end that dies leaves behind.

use std::time::Duration;

use virtio_dmabuf_protocol::{attach_flags, Direction, Status};

use super::{create, info, parked_lock, Check, Stop, Target};
use crate::session::Session;
use crate::vmm::LoopbackVmm;
use crate::{ensure, ensure_eq};

pub(super) fn vring_stop_cancels_that_queues_waiters_and_keeps_state(t: &Target) -> Check {
    let mut vmm = t.connect_loopback()?;
    let (object, a, _, parked) = parked_lock(vmm.driver())?;
    let bases = vmm.stop_vrings()?;
    // The waiting chain came back before GET_VRING_BASE answered.
    let d = vmm.driver();
    ensure!(d.poll(&parked)?, "parked chain completed by the vring stop");
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    vmm.resume(&bases)?;
    let d = vmm.driver();
    // State survived: A still holds the lock.
    ensure_eq!(d.lock(a, object, 0)?, Err(Status::Already));
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

/// Builds some state of every kind; returns the handles to check.
struct Held {
    object: u64,
    attachment: u64,
    ctx: u64,
    shm: bool,
    exported: Option<uuid::Uuid>,
}

fn hold_everything(vmm: &dyn Session) -> Result<Held, Stop> {
    let d = vmm.driver();
    let object = create(d, 2, 0)?;
    let attachment = d.attach(object, attach_flags::DYNAMIC_IMPORTER)??;
    let m = d.map(attachment, Direction::ToDevice, 8, 0)??;
    let _ = m;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let shm = (vmm.capabilities().shm_size > 0) && d.map_shm(object, true)?.is_ok();
    let exported = match d.export_uuid(object)? {
        Ok(u) => Some(uuid::Uuid::from_bytes(u)),
        Err(_) => None,
    };
    Ok(Held {
        object,
        attachment,
        ctx,
        shm,
        exported,
    })
}

/// For a front-end that dies mid-request: a session holding state of every
/// kind (an object attached, mapped, locked, in the window, published)
/// with a `LOCK` of a second context parked behind the lock. The session is
/// returned so nothing is released; the caller then goes away without a
/// word and the host checks that the daemon let go of everything.
pub fn hold_state_with_a_parked_request(t: &Target) -> Result<Box<dyn Session>, Stop> {
    let vmm = t.connect()?;
    hold_everything(&vmm)?;
    let (_, _, _, parked) = parked_lock(vmm.driver())?;
    ensure!(!vmm.driver().poll(&parked)?, "the LOCK is parked");
    Ok(vmm)
}

fn nothing_left(vmm: &dyn Session, held: &Held) -> Check {
    let d = vmm.driver();
    ensure_eq!(d.release(held.object)?, Err(Status::NoEnt));
    ensure_eq!(d.detach(held.attachment)?, Err(Status::NoEnt));
    ensure_eq!(d.acquire_fini(held.ctx)?, Err(Status::NoEnt));
    if held.shm {
        if let Some(shm) = vmm.loopback().and_then(LoopbackVmm::shm) {
            // SHMEM_UNMAP travels on the back-end channel, which the
            // front-end serves on its own thread: the reset's answer does
            // not wait for it (section 1), so give it a bounded moment.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !shm.mappings().is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            ensure!(
                shm.mappings().is_empty(),
                "window still mapped: {:?}",
                shm.mappings()
            );
        }
    }
    if let (Some(u), Some(vmm)) = (held.exported, vmm.loopback()) {
        // SHARED_OBJECT_REMOVE also travels on the back-end channel.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while vmm.backend_shared_objects().contains(&u) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        ensure!(
            !vmm.backend_shared_objects().contains(&u),
            "shared object {u} not removed"
        );
    }
    // A fresh object gets a handle never seen before.
    let o = create(d, 1, 0)?;
    ensure!(o != held.object);
    ensure_eq!(d.release(o)?, Ok(()));
    Ok(())
}

pub(super) fn reset_session_releases_everything_the_guest_held(t: &Target) -> Check {
    let vmm = t.connect()?;
    let held = hold_everything(&vmm)?;
    ensure_eq!(vmm.driver().reset_session()?, Ok(()));
    nothing_left(&vmm, &held)
}

pub(super) fn device_reset_releases_everything(t: &Target) -> Check {
    let mut vmm = t.connect()?;
    let held = hold_everything(&vmm)?;
    vmm.reset()?;
    nothing_left(&vmm, &held)
}

pub(super) fn reconnect_leaves_nothing_behind(t: &Target) -> Check {
    let vmm = t.connect_loopback()?;
    let held = hold_everything(&vmm)?;
    let before = info(vmm.driver())?;
    let vmm = vmm.reconnect()?;
    // Handles are per connection and never reused across connections.
    nothing_left(&vmm, &held)?;
    // The quotas are whole again.
    let after = info(vmm.driver())?;
    ensure_eq!(after.max_objects, before.max_objects);
    Ok(())
}
