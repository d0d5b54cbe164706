// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Two guests of one daemon, one socket each (`--socket-count 2`): they
//! share host exports and the stamp counter, nothing else (sections 6,
//! 7.2, 7.4; `docs/daemon.md`: guests are isolated).

use std::os::fd::AsFd;
use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, caps, lock_flags, Direction, FenceUsage, Reply, Status, CONTROLQ,
};

use super::{create, export_name, info, listed, page, pattern, Check, Stop, Target, SETTLE};
use crate::driver::{begin_cpu_access_request, lock_request};
use crate::host::{ExportOptions, HostControl, HostLockHolder};
use crate::session::Session;
use crate::{ensure, ensure_eq};

/// A session as guest 0 and one as guest 1.
type TwoGuests = (Box<dyn Session>, Box<dyn Session>);

/// Sessions as guests 0 and 1.
fn two_guests(t: &Target) -> Result<TwoGuests, Stop> {
    Ok((t.connect_guest(0)?, t.connect_guest(1)?))
}

/// Runs `body`, then revokes the export `name` whatever it returned.
fn revoking(host: &dyn HostControl, name: &str, body: impl FnOnce() -> Check) -> Check {
    let result = body();
    host.revoke(name).map_err(Stop::Fail)?;
    result
}

/// The lock holder of the object with `uuid`, as the host lists it.
fn lock_holder(host: &dyn HostControl, uuid: [u8; 16]) -> Result<Option<HostLockHolder>, Stop> {
    Ok(listed(host, uuid)?.lock_holder)
}

/// A one-page writable memfd export every guest may open.
fn shared_export(host: &dyn HostControl, prefix: &str, pg: u64) -> Result<String, Stop> {
    let name = export_name(prefix);
    let file = crate::vmm::shm::memfd_with("shared-export", &pattern(pg as usize, 9))
        .map_err(|e| Stop::Fail(e.to_string()))?;
    host.export(&name, file.as_fd(), &ExportOptions::default())
        .map_err(Stop::Fail)?;
    Ok(name)
}

pub(super) fn guests_cannot_name_each_others_handles(t: &Target) -> Check {
    let (g0, g1) = two_guests(t)?;
    let (d0, d1) = (g0.driver(), g1.driver());
    let pg = page(d0)?;
    let o0 = d0.create(pg, 0)??;
    let a0 = d0.attach(o0.object, attach_flags::DYNAMIC_IMPORTER)??;
    let m0 = d0.map(a0, Direction::ToDevice, 8, 0)??;
    let (c0, _) = d0.acquire_init()??;
    let o1 = create(d1, 1, 0)?;
    // Guest 1 names guest 0's object, attachment, mapping and context.
    ensure_eq!(d1.release(o0.object)?, Err(Status::NoEnt));
    ensure_eq!(d1.attach(o0.object, 0)?, Err(Status::NoEnt));
    ensure_eq!(d1.transfer_from_host(o0.object, 0, 8)?, Err(Status::NoEnt));
    ensure_eq!(
        d1.begin_cpu_access(o0.object, Direction::FromDevice)?,
        Err(Status::NoEnt)
    );
    ensure_eq!(d1.map_shm(o0.object, false)?, Err(Status::NoEnt));
    ensure_eq!(d1.export_uuid(o0.object)?, Err(Status::NoEnt));
    ensure_eq!(d1.map(a0, Direction::ToDevice, 8, 0)?, Err(Status::NoEnt));
    ensure_eq!(d1.pin(a0, 0)?, Err(Status::NoEnt));
    ensure_eq!(d1.detach(a0)?, Err(Status::NoEnt));
    ensure_eq!(d1.unmap(m0.mapping, 0)?, Err(Status::NoEnt));
    ensure_eq!(d1.lock(c0, o1, 0)?, Err(Status::NoEnt), "a foreign context");
    ensure_eq!(d1.acquire_fini(c0)?, Err(Status::NoEnt));
    // And the other way round.
    ensure_eq!(d0.transfer_to_host(o1, 0, b"x")?, Err(Status::NoEnt));
    ensure_eq!(d0.attach(o1, 0)?, Err(Status::NoEnt));
    ensure_eq!(d0.release(o1)?, Err(Status::NoEnt));
    // A UUID is no way in either: guest 1 resolves it locally only among
    // its own objects and the exports it may see; the front-end's LOOKUP
    // does not know it. The answer is that of an unknown UUID.
    let by_uuid = d1.open_by_uuid(o0.uuid)?;
    let unknown = d1.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?;
    ensure_eq!(by_uuid, unknown, "another guest's UUID");
    if info(d1)?.caps & caps::SHARED_OBJECTS != 0 {
        ensure_eq!(by_uuid, Err(Status::NoEnt));
    }
    // Nothing of guest 0 was disturbed.
    ensure_eq!(d0.unmap(m0.mapping, 0)?, Ok(()));
    ensure_eq!(d0.detach(a0)?, Ok(()));
    ensure_eq!(d0.acquire_fini(c0)?, Ok(()));
    ensure_eq!(d0.release(o0.object)?, Ok(()));
    ensure_eq!(d1.release(o1)?, Ok(()));
    Ok(())
}

pub(super) fn open_export_not_granted_is_enoent_like_a_missing_one(t: &Target) -> Check {
    let host = t.host()?;
    let (g0, g1) = two_guests(t)?;
    let (d0, d1) = (g0.driver(), g1.driver());
    let pg = page(d0)?;
    let name = export_name("guest1-only");
    let content = pattern(pg as usize, 21);
    let file = crate::vmm::shm::memfd_with("guest1-only", &content)
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let options = ExportOptions {
        guests: Some(vec![1]),
        ..ExportOptions::default()
    };
    host.export(&name, file.as_fd(), &options)
        .map_err(Stop::Fail)?;
    revoking(host, &name, || {
        // Guest 0: exactly the answer to a name that does not exist.
        let hidden = d0.open_by_name(&name)?;
        let missing = d0.open_by_name(&export_name("missing"))?;
        ensure_eq!(hidden, Err(Status::NoEnt));
        ensure_eq!(hidden, missing);
        // Guest 1 opens it and reads it.
        let o = d1.open_by_name(&name)??;
        ensure_eq!(o.size, pg);
        ensure_eq!(d1.transfer_from_host(o.object, 0, pg)?, Ok(content.clone()));
        // Its UUID does not open it for guest 0 either.
        let by_uuid = d0.open_by_uuid(o.uuid)?;
        let unknown = d0.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?;
        ensure_eq!(by_uuid, unknown, "a hidden export's UUID");
        // The host sees guest 1 holding it, guest 0 not.
        ensure_eq!(listed(host, o.uuid)?.guests, vec![1]);
        ensure_eq!(d1.release(o.object)?, Ok(()));
        Ok(())
    })
}

pub(super) fn two_guests_lock_contention_on_a_shared_export(t: &Target) -> Check {
    let host = t.host()?;
    let (g0, g1) = two_guests(t)?;
    let (d0, d1) = (g0.driver(), g1.driver());
    let name = shared_export(host, "shared-lock", page(d0)?)?;
    revoking(host, &name, || {
        let o0 = d0.open_by_name(&name)??;
        let o1 = d1.open_by_name(&name)??;
        ensure_eq!(o0.uuid, o1.uuid, "one object, a handle in each guest");
        // One stamp counter for every guest of the daemon.
        let (c0, s0) = d0.acquire_init()??;
        let (c1, s1) = d1.acquire_init()??;
        ensure!(s0 < s1, "stamps {s0} (guest 0) then {s1} (guest 1)");
        ensure_eq!(d0.lock(c0, o0.object, 0)?, Ok(()));
        ensure_eq!(
            d1.lock(c1, o1.object, lock_flags::TRY)?,
            Err(Status::Busy),
            "TRY on a lock the other guest holds"
        );
        // Wait-die across guests: guest 1's younger context, holding a
        // lock of its own, dies rather than wait for guest 0's older one.
        let own = create(d1, 1, 0)?;
        ensure_eq!(d1.lock(c1, own, 0)?, Ok(()));
        ensure_eq!(d1.lock(c1, o1.object, 0)?, Err(Status::Deadlk));
        ensure_eq!(d1.unlock(c1, own)?, Ok(()));
        ensure_eq!(d1.release(own)?, Ok(()));
        let parked = d1.submit(CONTROLQ, &lock_request(c1, o1.object, 0))?;
        ensure!(
            !d1.settle(&parked, SETTLE)?,
            "guest 1's LOCK must wait for guest 0"
        );
        ensure_eq!(
            lock_holder(host, o0.uuid)?,
            Some(HostLockHolder {
                guest: Some(0),
                stamp: Some(s0)
            })
        );
        // Guest 0 works under the lock, then lets go: guest 1's chain
        // completes on guest 1's queue.
        ensure_eq!(
            d0.transfer_to_host(o0.object, 0, b"guest 0 was here")?,
            Ok(())
        );
        ensure_eq!(d0.unlock(c0, o0.object)?, Ok(()));
        ensure_eq!(d1.complete(parked)?, Ok(Reply::Empty));
        ensure_eq!(d0.in_flight(CONTROLQ), 0);
        ensure_eq!(
            lock_holder(host, o1.uuid)?,
            Some(HostLockHolder {
                guest: Some(1),
                stamp: Some(s1)
            })
        );
        ensure_eq!(d0.lock(c0, o0.object, lock_flags::TRY)?, Err(Status::Busy));
        ensure_eq!(
            d1.transfer_from_host(o1.object, 0, 16)?,
            Ok(b"guest 0 was here".to_vec())
        );
        ensure_eq!(d1.unlock(c1, o1.object)?, Ok(()));
        ensure_eq!(d0.acquire_fini(c0)?, Ok(()));
        ensure_eq!(d1.acquire_fini(c1)?, Ok(()));
        ensure_eq!(d0.release(o0.object)?, Ok(()));
        ensure_eq!(d1.release(o1.object)?, Ok(()));
        Ok(())
    })
}

pub(super) fn two_guests_disconnect_releases_the_lock(t: &Target) -> Check {
    let host = t.host()?;
    let (g0, g1) = two_guests(t)?;
    let d1 = g1.driver();
    let name = shared_export(host, "disconnect-lock", page(d1)?)?;
    revoking(host, &name, || {
        let o0 = g0.driver().open_by_name(&name)??;
        let o1 = d1.open_by_name(&name)??;
        let (c0, _) = g0.driver().acquire_init()??;
        let (c1, s1) = d1.acquire_init()??;
        ensure_eq!(g0.driver().lock(c0, o0.object, 0)?, Ok(()));
        g0.driver()
            .fence_attach(c0, o0.object, FenceUsage::Write)??;
        let parked = d1.submit(CONTROLQ, &lock_request(c1, o1.object, 0))?;
        let reader = d1.submit(
            CONTROLQ,
            &begin_cpu_access_request(o1.object, Direction::FromDevice),
        )?;
        ensure!(!d1.settle(&parked, SETTLE)?, "the lock is guest 0's");
        ensure!(!d1.poll(&reader)?, "guest 0's WRITE fence is pending");
        ensure_eq!(listed(host, o1.uuid)?.fences_pending, 1);
        // Guest 0 goes away (its VMM disconnects, or it resets the device) holding the lock, its fence unsignalled.
        g0.end();
        ensure_eq!(
            d1.complete_within(parked, Duration::from_secs(5))?,
            Ok(Reply::Empty),
            "guest 1 gets the lock guest 0 held when it disconnected"
        );
        ensure_eq!(
            d1.complete_within(reader, Duration::from_secs(5))?,
            Ok(Reply::Empty),
            "guest 0's fence was signalled when it went away"
        );
        ensure_eq!(d1.end_cpu_access(o1.object, Direction::FromDevice)?, Ok(()));
        ensure_eq!(
            lock_holder(host, o1.uuid)?,
            Some(HostLockHolder {
                guest: Some(1),
                stamp: Some(s1)
            })
        );
        let after = listed(host, o1.uuid)?;
        ensure_eq!(after.guests, vec![1], "guest 0's handle went with it");
        ensure_eq!(after.fences_pending, 0);
        ensure_eq!(d1.unlock(c1, o1.object)?, Ok(()));
        ensure_eq!(d1.acquire_fini(c1)?, Ok(()));
        ensure_eq!(d1.release(o1.object)?, Ok(()));
        Ok(())
    })
}
