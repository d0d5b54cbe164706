// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Objects (sections 7.2, 8): their lifecycle, handles, `EBUSY` while in
//! use, and host exports opened by name and revoked.

use std::os::fd::AsFd;
use std::time::Duration;

use virtio_dmabuf_protocol::{map_flags, AddressSpace, Direction, EventType, Status, EVENT_SIZE};

use super::{create, next_event, page, pattern, total_len, Check, ExportOptions, Stop, Target};
use crate::session::Session;
use crate::{ensure, ensure_eq};

pub(super) fn object_lifecycle_create_attach_map_unmap_detach_release(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let o = d.create(4 * pg, 0)??;
    ensure!(o.object != 0);
    ensure_eq!(o.size, 4 * pg);
    ensure!(o.obj_flags & virtio_dmabuf_protocol::obj_flags::WRITABLE != 0);
    ensure_eq!(uuid::Uuid::from_bytes(o.uuid).get_version_num(), 4);
    // Host placement is zero-filled.
    ensure_eq!(d.transfer_from_host(o.object, 0, 64)?, Ok(vec![0u8; 64]));
    let a = d.attach(o.object, 0)??;
    let m = d.map(a, Direction::ToDevice, 64, 0)??;
    ensure_eq!(
        m.space,
        AddressSpace::Object,
        "no MAP_SHM: offsets in the object"
    );
    ensure_eq!(total_len(&m), 4 * pg);
    ensure_eq!(m.map_flags & map_flags::CACHED, 0);
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.unmap(m.mapping, 0)?, Err(Status::NoEnt));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.detach(a)?, Err(Status::NoEnt));
    ensure_eq!(d.release(o.object)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Err(Status::NoEnt));
    ensure_eq!(d.attach(o.object, 0)?, Err(Status::NoEnt));
    Ok(())
}

pub(super) fn release_and_detach_are_ebusy_while_in_use(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let a = d.attach(object, 0)??;
    ensure_eq!(d.release(object)?, Err(Status::Busy));
    let m = d.map(a, Direction::FromDevice, 8, 0)??;
    ensure_eq!(d.detach(a)?, Err(Status::Busy));
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn handles_are_nonzero_and_never_reused(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let o = create(d, 1, 0)?;
        ensure!(seen.insert(o), "handle {o} reused");
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

pub(super) fn host_export_open_and_revoke(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let name = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    let name = &name[..24];
    let content = pattern(2 * pg as usize, 11);
    let file =
        crate::vmm::shm::memfd_with("export", &content).map_err(|e| Stop::Fail(e.to_string()))?;
    let options = ExportOptions {
        read_only: true,
        ..ExportOptions::default()
    };
    host.export(name, file.as_fd(), &options)
        .map_err(Stop::Fail)?;
    d.post_event_buffers(1, EVENT_SIZE as u32)?;
    let o = d.open_by_name(name)??;
    ensure_eq!(o.size, 2 * pg);
    ensure_eq!(
        o.obj_flags & virtio_dmabuf_protocol::obj_flags::WRITABLE,
        0,
        "read-only export"
    );
    ensure_eq!(
        d.transfer_from_host(o.object, 0, 64)?,
        Ok(content[..64].to_vec())
    );
    ensure_eq!(d.transfer_to_host(o.object, 0, b"x")?, Err(Status::Perm));
    // Opening again returns the same handle with another reference.
    ensure_eq!(d.open_by_name(name)?.map(|r| r.object), Ok(o.object));
    ensure_eq!(d.release(o.object)?, Ok(()));
    ensure_eq!(d.open_by_name("no-such-export")?, Err(Status::NoEnt));
    host.revoke(name).map_err(Stop::Fail)?;
    let event = next_event(d, Duration::from_secs(2), "REVOKED")?;
    ensure_eq!((event.kind, event.object), (EventType::Revoked, o.object));
    ensure_eq!(d.transfer_from_host(o.object, 0, 8)?, Err(Status::NoEnt));
    ensure_eq!(
        d.release(o.object)?,
        Ok(()),
        "a revoked handle's RELEASE frees it"
    );
    ensure_eq!(d.release(o.object)?, Err(Status::NoEnt));
    Ok(())
}

/// A host export whose size its owner can still change (a memfd without
/// `F_SEAL_SHRINK`) never goes into the window: the VMM would fault with
/// `SIGBUS` on a guest access after a truncate. `MAP_SHM` is `EOPNOTSUPP`
/// and the copy path serves it; a sealed one is placed.
pub(super) fn map_shm_of_a_host_fd_that_can_shrink_is_eopnotsupp(t: &Target) -> Check {
    let host = t.host()?;
    if !host.shares_our_kernel() {
        crate::skip!("the host makes its own memfd of the bytes sent (always sealed)");
    }
    let vmm = t.connect()?;
    let d = vmm.driver();
    super::need_cap(
        d,
        virtio_dmabuf_protocol::caps::HOST_SHM,
        "HOST_SHM",
        super::shm_negotiated(&*vmm),
    )?;
    let pg = page(d)?;
    let content = pattern(pg as usize, 5);
    let fail = |e: std::io::Error| Stop::Fail(e.to_string());
    let unsealed = rustix::fs::memfd_create("resizable", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| fail(e.into()))?;
    rustix::io::pwrite(&unsealed, &content, 0).map_err(|e| fail(e.into()))?;
    let sealed = crate::vmm::shm::memfd_with("sealed", &content).map_err(fail)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let names = [
        format!("resizable-{}", &id[..12]),
        format!("sealed-{}", &id[..12]),
    ];
    host.export(&names[0], unsealed.as_fd(), &ExportOptions::default())
        .map_err(Stop::Fail)?;
    host.export(&names[1], sealed.as_fd(), &ExportOptions::default())
        .map_err(Stop::Fail)?;
    let resizable = d.open_by_name(&names[0])??;
    ensure_eq!(
        d.map_shm(resizable.object, false)?,
        Err(Status::NotSupported)
    );
    ensure_eq!(
        d.transfer_from_host(resizable.object, 0, 64)?,
        Ok(content[..64].to_vec()),
        "the copy path serves it"
    );
    let fixed = d.open_by_name(&names[1])??;
    let (off, len) = d.map_shm(fixed.object, false)??;
    ensure_eq!(len, pg);
    ensure_eq!(vmm.shm_read(off, 64)?, content[..64].to_vec());
    ensure_eq!(d.unmap_shm(fixed.object)?, Ok(()));
    for (name, o) in names.iter().zip([resizable.object, fixed.object]) {
        ensure_eq!(d.release(o)?, Ok(()));
        host.revoke(name).map_err(Stop::Fail)?;
    }
    Ok(())
}
