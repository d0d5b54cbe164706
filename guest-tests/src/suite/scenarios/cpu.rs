// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The CPU's view of objects (section 7.5): `TRANSFER`, the shared-memory
//! window and objects placed in guest pages.

use virtio_dmabuf_protocol::{attach_flags, caps, AddressSpace, Direction, Segment, Status};

use super::{
    create, info, need_cap, page, pattern, ram_end, shm_negotiated, total_len, Check, Target,
};
use crate::session::Session;
use crate::vmm::LoopbackVmm;
use crate::{ensure, ensure_eq};

pub(super) fn transfer_round_trip_and_bounds(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let object = create(d, 4, 0)?;
    let data = pattern(2 * pg as usize + 17, 3);
    ensure_eq!(d.transfer_to_host(object, pg - 9, &data)?, Ok(()));
    ensure_eq!(
        d.transfer_from_host(object, pg - 9, data.len() as u64)?,
        Ok(data)
    );
    ensure_eq!(
        d.transfer_to_host(object, 4 * pg - 1, &[1, 2])?,
        Err(Status::Inval)
    );
    ensure_eq!(d.transfer_from_host(object, 4 * pg, 1)?, Err(Status::Inval));
    ensure_eq!(
        d.transfer_from_host(object, u64::MAX - 3, 8)?,
        Err(Status::Inval)
    );
    ensure_eq!(d.transfer_from_host(12345678, 0, 8)?, Err(Status::NoEnt));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn shm_window_sees_transfers_both_ways(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::HOST_SHM, "HOST_SHM", shm_negotiated(&vmm))?;
    // The front-end's side of the window, where it is this process.
    let shm = vmm.loopback().and_then(LoopbackVmm::shm);
    let pg = page(d)?;
    let object = create(d, 2, 0)?;
    let (off, len) = d.map_shm(object, true)??;
    ensure_eq!(len, 2 * pg);
    ensure_eq!(off % pg, 0);
    if let Some(shm) = shm {
        ensure!(
            shm.mappings()
                .iter()
                .any(|m| m.offset == off && m.len == len && m.writable),
            "{:?}",
            shm.mappings()
        );
    }
    // Written by TRANSFER, read through the window.
    let a = pattern(2 * pg as usize, 7);
    ensure_eq!(d.transfer_to_host(object, 0, &a)?, Ok(()));
    ensure_eq!(vmm.shm_read(off, a.len())?, a);
    // Written through the window, read by TRANSFER.
    let b = pattern(100, 99);
    vmm.shm_write(off + pg - 50, &b)?;
    ensure_eq!(d.transfer_from_host(object, pg - 50, 100)?, Ok(b.clone()));
    // One window mapping per object; a different writability is EBUSY.
    ensure_eq!(d.map_shm(object, false)?, Err(Status::Busy));
    ensure_eq!(
        d.map_shm(object, true)?,
        Ok((off, len)),
        "counted per use, same offset"
    );
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    if let Some(shm) = shm {
        ensure!(
            shm.mappings().iter().any(|m| m.offset == off),
            "still used once"
        );
    }
    // Still mapped: the bytes are there.
    ensure_eq!(vmm.shm_read(off + pg - 50, 100)?, b);
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    if let Some(shm) = shm {
        ensure!(
            shm.mappings().iter().all(|m| m.offset != off),
            "window mapping removed"
        );
    }
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn shm_peer2peer_map_is_in_the_window(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::HOST_SHM, "HOST_SHM", shm_negotiated(&vmm))?;
    let object = create(d, 2, 0)?;
    let (off, len) = d.map_shm(object, true)??;
    let a = d.attach(object, attach_flags::PEER2PEER)??;
    let m = d.map(a, Direction::Bidirectional, 16, 0)??;
    ensure_eq!(m.space, AddressSpace::Shm);
    ensure_eq!(total_len(&m), len);
    ensure!(
        m.entries
            .iter()
            .all(|e| e.addr >= off && e.addr + e.len <= off + len),
        "{m:?}"
    );
    ensure_eq!(
        d.unmap_shm(object)?,
        Err(Status::Busy),
        "an SHM mapping is outstanding"
    );
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn without_shmem_map_shm_is_eopnotsupp(t: &Target) -> Check {
    let vmm = t.connect_with(|o| o.shmem = false)?;
    let d = vmm.driver();
    let i = info(d)?;
    ensure_eq!(i.caps & caps::HOST_SHM, 0);
    ensure_eq!(i.shm_size, 0);
    let object = create(d, 1, 0)?;
    ensure_eq!(d.map_shm(object, true)?, Err(Status::NotSupported));
    // TRANSFER is the fallback and works.
    ensure_eq!(d.transfer_to_host(object, 0, b"fallback")?, Ok(()));
    ensure_eq!(
        d.transfer_from_host(object, 0, 8)?,
        Ok(b"fallback".to_vec())
    );
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn guest_pages_objects_share_guest_memory(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::GUEST_PAGES, "GUEST_PAGES", true)?;
    let pg = page(d)?;
    let p1 = d.pool().alloc(pg, pg)?;
    let p2 = d.pool().alloc(2 * pg, pg)?;
    let entries = [
        Segment {
            addr: p2.gpa,
            len: 2 * pg,
        },
        Segment {
            addr: p1.gpa,
            len: pg,
        },
    ];
    let data = pattern(3 * pg as usize, 5);
    d.memory().write(p2.gpa, &data[..2 * pg as usize])?;
    d.memory().write(p1.gpa, &data[2 * pg as usize..])?;
    let o = d.create_guest(3 * pg, false, &entries)??;
    ensure!(o.obj_flags & virtio_dmabuf_protocol::obj_flags::GUEST_PAGES != 0);
    // The object is the guest's pages, in list order.
    ensure_eq!(d.transfer_from_host(o.object, 0, 3 * pg)?, Ok(data));
    ensure_eq!(d.transfer_to_host(o.object, 2 * pg, b"via host")?, Ok(()));
    let mut seen = [0u8; 8];
    d.memory().read(p1.gpa, &mut seen)?;
    ensure_eq!(&seen, b"via host");
    let a = d.attach(o.object, 0)??;
    let m = d.map(a, Direction::ToDevice, 16, 0)??;
    ensure_eq!(m.space, AddressSpace::GuestPhys);
    ensure_eq!(total_len(&m), 3 * pg);
    ensure_eq!(m.entries.first().map(|e| e.addr), Some(p2.gpa));
    ensure_eq!(d.map_shm(o.object, false)?, Err(Status::NotSupported));
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    // Bad lists: unaligned, sum differs from size, outside guest RAM.
    let bad = [Segment {
        addr: p1.gpa + 8,
        len: pg,
    }];
    ensure_eq!(d.create_guest(pg, false, &bad)?, Err(Status::Inval));
    ensure_eq!(
        d.create_guest(
            2 * pg,
            false,
            &[Segment {
                addr: p1.gpa,
                len: pg
            }]
        )?,
        Err(Status::Inval)
    );
    let far = ram_end(&vmm) + (1 << 30);
    // Section 7.2 lists "inside guest RAM" among the EINVAL conditions of
    // CREATE, section 4/5 make an address outside guest memory EFAULT: both
    // readings are accepted (docs/guest-tests.md).
    let outside = d.create_guest(pg, false, &[Segment { addr: far, len: pg }])?;
    ensure!(
        outside == Err(Status::Inval) || outside == Err(Status::Fault),
        "entries outside guest RAM: {outside:?}"
    );
    d.pool().free(p1);
    d.pool().free(p2);
    Ok(())
}
