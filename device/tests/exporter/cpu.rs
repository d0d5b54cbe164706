// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CPU access, the shared-memory window and TRANSFER (contract section 7.5;
//! `src/exporter/cpu.rs`).

use super::helpers::*;

#[test]
fn begin_cpu_access_for_reading_waits_only_for_writers() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let r = d.fence(0, ctx, o, FenceUsage::Read);
    let w = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    let t_write = d.park(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: ToDevice,
        },
    );
    d.ok(0, Dev::signal_req(w, 0));
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
    d.ok(0, Dev::signal_req(r, 0));
    assert_eq!(
        d.completed(t_write),
        Some(Ok(Reply::Empty)),
        "writers wait for readers too"
    );
}

#[test]
fn map_shm_places_the_object_once_and_counts_uses() {
    let mut d = Dev::new();
    let o = d.create(0, 2, false, false);
    let r1 = d.ok(0, Dev::map_shm_req(o, true));
    let r2 = d.ok(0, Dev::map_shm_req(o, true));
    assert_eq!(r1, r2);
    assert_eq!(d.fe[0].lock().unwrap().shm_maps, vec![(0, 2 * PAGE, true)]);
    d.ok(0, Request::UnmapShm { object: o });
    assert!(d.fe[0].lock().unwrap().shm_unmaps.is_empty());
    d.ok(0, Request::UnmapShm { object: o });
    assert_eq!(d.fe[0].lock().unwrap().shm_unmaps, vec![(0, 2 * PAGE)]);
}

#[test]
fn map_shm_with_other_writability_is_ebusy() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    d.ok(0, Dev::map_shm_req(o, false));
    assert_eq!(d.err(0, Dev::map_shm_req(o, true)), Status::Busy);
}

#[test]
fn map_shm_full_window_is_enospc() {
    let mut d = Dev::new();
    let a = d.create(0, 40, false, false);
    let b = d.create(0, 40, false, false);
    d.ok(0, Dev::map_shm_req(a, false));
    assert_eq!(d.err(0, Dev::map_shm_req(b, false)), Status::NoSpc);
}

#[test]
fn map_shm_without_shmem_or_for_guest_pages_is_eopnotsupp() {
    let mut d = Dev::with(
        Limits::default(),
        1,
        GuestCaps {
            shm_size: 0,
            shared_objects: false,
            guest_pages: true,
        },
    );
    let o = d.create(0, 1, false, false);
    assert_eq!(d.err(0, Dev::map_shm_req(o, false)), Status::NotSupported);
    let mut d = Dev::new();
    let g = handle(guest_create(&mut d, PAGE, vec![Segment { addr: 0, len: PAGE }]).unwrap());
    assert_eq!(d.err(0, Dev::map_shm_req(g, false)), Status::NotSupported);
}

#[test]
fn map_shm_of_a_host_fd_that_can_shrink_is_eopnotsupp() {
    // The VMM maps what the window holds: a file its owner truncates would
    // fault it with SIGBUS. Only a buffer of fixed size is placed; the
    // other keeps the copy path (`Backing::size_is_fixed`).
    use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
    let mut d = Dev::new();
    for (name, seal) in [("resizable", false), ("sealed", true)] {
        let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, PAGE).unwrap();
        if seal {
            fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        }
        let backing = vhost_device_dmabuf::provider::import_host_fd(fd).unwrap();
        d.ex.host_export(
            ExportSpec {
                name: name.into(),
                dynamic: false,
                read_only: false,
                guests: None,
            },
            backing,
        )
        .unwrap();
    }
    let resizable = handle(open_name(&mut d, 0, "resizable").unwrap());
    assert_eq!(
        d.err(0, Dev::map_shm_req(resizable, false)),
        Status::NotSupported
    );
    d.ok(
        0,
        Request::TransferToHost {
            object: resizable,
            offset: 0,
            data: b"copy path".to_vec(),
        },
    );
    let listed = d.ex.list();
    assert!(listed
        .iter()
        .any(|o| o.export.as_deref() == Some("resizable") && !o.window));
    assert!(listed
        .iter()
        .any(|o| o.export.as_deref() == Some("sealed") && o.window));
    let sealed = handle(open_name(&mut d, 0, "sealed").unwrap());
    d.ok(0, Dev::map_shm_req(sealed, false));
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let mut d = Dev::new();
    export(&mut d, "ro", 1, false, true, None);
    let h = handle(open_name(&mut d, 0, "ro").unwrap());
    assert_eq!(d.err(0, Dev::map_shm_req(h, true)), Status::Perm);
    assert_eq!(
        d.err(
            0,
            Request::TransferToHost {
                object: h,
                offset: 0,
                data: vec![1]
            }
        ),
        Status::Perm
    );
    d.ok(0, Dev::map_shm_req(h, false));
}

#[test]
fn unmap_shm_is_ebusy_while_an_shm_mapping_is_outstanding() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach_p2p(0, o, false, true);
    d.ok(0, Dev::map_shm_req(o, false));
    let m = d.map(0, a, Bidi, 0);
    assert_eq!(d.err(0, Request::UnmapShm { object: o }), Status::Busy);
    d.unmap(0, m.mapping);
    d.ok(0, Request::UnmapShm { object: o });
}

#[test]
fn transfer_round_trips_bytes_bracketed_by_cpu_access_syncs() {
    let mut d = Dev::new();
    let o = d.create(0, 2, false, false);
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mark = d.sync_mark();
    d.ok(
        0,
        Request::TransferToHost {
            object: o,
            offset: PAGE - 100,
            data: data.clone(),
        },
    );
    let r = d.ok(
        0,
        Request::TransferFromHost {
            object: o,
            offset: PAGE - 100,
            len: 3000,
        },
    );
    assert_eq!(r, Reply::Data(data));
    assert_eq!(
        d.syncs_since(mark),
        vec![START_WRITE, END_WRITE, START_READ, END_READ]
    );
}

#[test]
fn transfer_beyond_the_object_is_einval() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    assert_eq!(
        d.err(
            0,
            Request::TransferFromHost {
                object: o,
                offset: 1,
                len: PAGE
            }
        ),
        Status::Inval
    );
    assert_eq!(
        d.err(
            0,
            Request::TransferFromHost {
                object: o,
                offset: u64::MAX,
                len: 2
            }
        ),
        Status::Inval
    );
    assert_eq!(
        d.err(
            0,
            Request::TransferToHost {
                object: o,
                offset: PAGE,
                data: vec![0]
            }
        ),
        Status::Inval
    );
}

#[test]
fn transfer_waits_for_fences_like_cpu_access() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::TransferFromHost {
            object: o,
            offset: 0,
            len: 4,
        },
    );
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(d.completed(t), Some(Ok(Reply::Data(vec![0; 4]))));
}

/// Section 7.5: `UNMAP_SHM` is `EBUSY` "while this guest has outstanding
/// mappings with space SHM of the object"; a mapping a move invalidated is
/// outstanding until `UNMAP` (section 6), and its window offset still holds.
#[test]
fn unmap_shm_is_ebusy_while_a_moved_shm_mapping_is_outstanding() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach_p2p(0, o, true, true);
    d.ok(0, Dev::map_shm_req(o, false));
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let m = d.map(0, a, Bidi, ctx);
    assert_eq!(m.space, AddressSpace::Shm);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    assert_eq!(d.err(0, Request::UnmapShm { object: o }), Status::Busy);
    d.unmap(0, m.mapping);
    d.ok(0, Request::UnmapShm { object: o });
}
