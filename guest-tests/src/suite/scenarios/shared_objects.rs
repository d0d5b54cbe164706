// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared objects (section 7.2): `EXPORT_UUID` and `OPEN BY_UUID`, locally
//! and through the front-end's shared-object table.

use std::time::Duration;

use virtio_dmabuf_protocol::{caps, Status};

use super::{create, info, need_cap, page, shared_object_negotiated, Check, Stop, Target};
use crate::session::Session;
use crate::{ensure, ensure_eq, skip};

/// A one-page object published with `EXPORT_UUID`, or a skip where shared
/// objects are not live (or memfd objects may not be published).
fn exported_object(vmm: &dyn Session) -> Result<(u64, [u8; 16]), Stop> {
    let d = vmm.driver();
    need_cap(
        d,
        caps::SHARED_OBJECTS,
        "SHARED_OBJECTS",
        shared_object_negotiated(vmm),
    )?;
    let object = create(d, 1, 0)?;
    let uuid = match d.export_uuid(object)? {
        Ok(u) => u,
        Err(Status::NotSupported) => {
            skip!("EXPORT_UUID needs a REAL_DMABUF object or --allow-memfd-shared-objects")
        }
        Err(s) => return Err(Stop::Fail(format!("EXPORT_UUID: {s}"))),
    };
    Ok((object, uuid))
}

/// `EXPORT_UUID` and `OPEN BY_UUID` of the guest's own UUID, on any
/// front-end: the UUID resolves locally, an unknown one is `ENOENT`, and the
/// UUID dies with the object.
pub(super) fn open_by_uuid_resolves_own_objects_locally(t: &Target) -> Check {
    let vmm = t.connect()?;
    let (object, uuid) = exported_object(&vmm)?;
    let d = vmm.driver();
    ensure_eq!(d.export_uuid(object)?, Ok(uuid), "one UUID per object");
    let o = d.open_by_uuid(uuid)??;
    ensure_eq!(o.object, object);
    ensure_eq!(d.release(object)?, Ok(()), "drops the OPEN reference");
    ensure_eq!(
        d.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?,
        Err(Status::NoEnt)
    );
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn open_by_uuid_of_another_device_uses_shared_object_lookup(t: &Target) -> Check {
    let mut vmm = t.connect_loopback()?;
    let (object, uuid) = exported_object(&vmm)?;
    let uuid = uuid::Uuid::from_bytes(uuid);
    ensure!(
        vmm.backend_shared_objects().contains(&uuid),
        "SHARED_OBJECT_ADD sent"
    );
    // The front-end can get the fd back (GET_SHARED_OBJECT).
    let file = vmm.get_shared_object(uuid)?;
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let d = vmm.driver();
    ensure_eq!(size, page(d)?);
    // Our own UUID resolves locally to the same handle.
    let o = d.open_by_uuid(*uuid.as_bytes())??;
    ensure_eq!(o.object, object);
    ensure_eq!(d.release(object)?, Ok(()), "drops the OPEN reference");
    // Another device's object whose size is not a page multiple: EIO.
    let odd = uuid::Uuid::new_v4();
    let file =
        crate::vmm::shm::memfd_with("odd", &[1u8; 100]).map_err(|e| Stop::Fail(e.to_string()))?;
    vmm.publish_shared_object(odd, file.into());
    let d = vmm.driver();
    ensure_eq!(d.open_by_uuid(*odd.as_bytes())?, Err(Status::Io));
    // Unknown UUIDs (the front-end's LOOKUP fails) are ENOENT.
    ensure_eq!(
        d.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?,
        Err(Status::NoEnt)
    );
    ensure_eq!(d.release(object)?, Ok(()));
    // The object died: SHARED_OBJECT_REMOVE.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        !vmm.backend_shared_objects().contains(&uuid)
    });
    ensure!(gone, "SHARED_OBJECT_REMOVE after the last release");
    Ok(())
}

pub(super) fn export_uuid_without_shared_objects_is_eopnotsupp(t: &Target) -> Check {
    let vmm = t.connect_with(|o| o.shared_object = false)?;
    let d = vmm.driver();
    let i = info(d)?;
    ensure_eq!(i.caps & caps::SHARED_OBJECTS, 0);
    let object = create(d, 1, 0)?;
    ensure_eq!(d.export_uuid(object)?, Err(Status::NotSupported));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}
