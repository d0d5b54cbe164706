// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CREATE, OPEN, RELEASE, EXPORT_UUID and object lifetime (contract sections 6
//! and 7.2; `src/exporter/objects.rs`).

use super::helpers::*;

#[test]
fn handles_are_nonzero_and_never_reused() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    d.ok(0, Request::Release { object: a });
    let b = d.create(0, 1, false, false);
    d.ok(0, Request::ResetSession);
    let c = d.create(0, 1, false, false);
    assert!(a != 0 && b != 0 && c != 0);
    assert!(a != b && b != c && a != c);
}

#[test]
fn create_size_zero_or_not_page_multiple_is_einval() {
    let mut d = Dev::new();
    for size in [0, PAGE + 1, 100] {
        let r = d.err(
            0,
            Request::Create {
                size,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None,
            },
        );
        assert_eq!(r, Status::Inval);
    }
}

#[test]
fn create_host_placement_is_zero_filled() {
    let mut d = Dev::new();
    let o = d.create(0, 2, false, false);
    let r = d.ok(
        0,
        Request::TransferFromHost {
            object: o,
            offset: 0,
            len: 2 * PAGE,
        },
    );
    assert_eq!(r, Reply::Data(vec![0; 2 * PAGE as usize]));
}

#[test]
fn create_reply_reports_flags_and_uuid_v4() {
    let mut d = Dev::new();
    let r = d.create_reply(0, 1, true);
    assert_eq!(r.obj_flags, obj_flags::DYNAMIC | obj_flags::WRITABLE);
    assert_eq!(r.size, PAGE);
    assert_eq!(uuid::Uuid::from_bytes(r.uuid).get_version_num(), 4);
}

#[test]
fn guest_placed_objects_are_static_exporters() {
    let mut d = Dev::new();
    let r = d.ok(
        0,
        Request::Create {
            size: 2 * PAGE,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(vec![
                Segment {
                    addr: 0x10000,
                    len: PAGE,
                },
                Segment {
                    addr: 0x40000,
                    len: PAGE,
                },
            ]),
        },
    );
    let Reply::Object(o) = r else { panic!() };
    assert_eq!(
        o.obj_flags & (obj_flags::GUEST_PAGES | obj_flags::DYNAMIC),
        obj_flags::GUEST_PAGES
    );
    assert_eq!(d.ex.list()[0].placement, "guest");
}

#[test]
fn create_over_max_object_size_is_einval() {
    let mut d = Dev::new();
    let size = (256 << 20) + PAGE;
    assert_eq!(
        d.err(
            0,
            Request::Create {
                size,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None
            }
        ),
        Status::Inval
    );
}

#[test]
fn create_guest_pages_misaligned_entry_is_einval() {
    let mut d = Dev::new();
    let r = guest_create(
        &mut d,
        PAGE,
        vec![Segment {
            addr: 0x10001,
            len: PAGE,
        }],
    );
    assert_eq!(r, Err(Status::Inval));
}

#[test]
fn create_guest_pages_lengths_must_sum_to_size() {
    let mut d = Dev::new();
    let r = guest_create(
        &mut d,
        2 * PAGE,
        vec![Segment {
            addr: 0x10000,
            len: PAGE,
        }],
    );
    assert_eq!(r, Err(Status::Inval));
}

#[test]
fn create_guest_pages_over_max_segments_is_einval() {
    let mut d = Dev::with_limits(Limits {
        max_segments: 2,
        ..Limits::default()
    });
    let e = |i: u64| Segment {
        addr: i * PAGE,
        len: PAGE,
    };
    let r = guest_create(&mut d, 3 * PAGE, vec![e(1), e(3), e(5)]);
    assert_eq!(r, Err(Status::Inval));
}

#[test]
fn create_guest_pages_outside_guest_ram_is_efault() {
    let mut d = Dev::new();
    let r = guest_create(
        &mut d,
        PAGE,
        vec![Segment {
            addr: GUEST_RAM,
            len: PAGE,
        }],
    );
    assert_eq!(r, Err(Status::Fault));
}

#[test]
fn create_guest_pages_without_capability_is_eopnotsupp() {
    let mut d = Dev::with(Limits::default(), 1, GuestCaps::default());
    let r = guest_create(&mut d, PAGE, vec![Segment { addr: 0, len: PAGE }]);
    assert_eq!(r, Err(Status::NotSupported));
}

#[test]
fn create_over_object_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_objects: 2,
        ..Limits::default()
    });
    d.create(0, 1, false, false);
    d.create(0, 1, false, false);
    assert_eq!(
        d.err(
            0,
            Request::Create {
                size: PAGE,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None
            }
        ),
        Status::NoSpc
    );
}

#[test]
fn create_over_byte_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_bytes: 3 * PAGE,
        ..Limits::default()
    });
    d.create(0, 2, false, false);
    assert_eq!(
        d.err(
            0,
            Request::Create {
                size: 2 * PAGE,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None
            }
        ),
        Status::NoSpc
    );
    d.create(0, 1, false, false);
}

#[test]
fn open_host_export_by_name() {
    let mut d = Dev::new();
    let uuid = export(&mut d, "camera0", 4, false, true, None);
    let Reply::Object(o) = open_name(&mut d, 0, "camera0").unwrap() else {
        panic!()
    };
    assert_eq!(o.size, 4 * PAGE);
    assert_eq!(o.uuid, *uuid.as_bytes());
    assert_eq!(o.obj_flags & obj_flags::WRITABLE, 0, "read-only export");
}

#[test]
fn open_export_not_granted_is_enoent_like_a_missing_one() {
    let mut d = Dev::new();
    export(&mut d, "only1", 1, false, false, Some(vec![1]));
    assert_eq!(open_name(&mut d, 0, "only1"), Err(Status::NoEnt));
    assert_eq!(open_name(&mut d, 0, "nothere"), Err(Status::NoEnt));
    assert!(open_name(&mut d, 1, "only1").is_ok());
}

#[test]
fn open_twice_returns_the_same_handle_and_adds_a_reference() {
    let mut d = Dev::new();
    export(&mut d, "buf", 1, false, false, None);
    let h1 = handle(open_name(&mut d, 0, "buf").unwrap());
    let h2 = handle(open_name(&mut d, 0, "buf").unwrap());
    assert_eq!(h1, h2);
    d.ok(0, Request::Release { object: h1 });
    d.ok(
        0,
        Request::BeginCpuAccess {
            object: h1,
            dir: FromDevice,
        },
    );
    d.ok(0, Request::Release { object: h1 });
    assert_eq!(
        d.err(
            0,
            Request::BeginCpuAccess {
                object: h1,
                dir: FromDevice
            }
        ),
        Status::NoEnt
    );
}

#[test]
fn host_exports_survive_the_last_guest_release() {
    let mut d = Dev::new();
    export(&mut d, "keep", 1, false, false, None);
    let h = handle(open_name(&mut d, 0, "keep").unwrap());
    d.ok(0, Request::Release { object: h });
    d.ok(0, Request::ResetSession);
    assert_eq!(d.object_count(), 1);
    assert!(open_name(&mut d, 1, "keep").is_ok());
}

#[test]
fn release_last_reference_is_ebusy_while_attached() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    assert_eq!(d.err(0, Request::Release { object: o }), Status::Busy);
    d.ok(0, Request::Detach { attachment: a });
    d.ok(0, Request::Release { object: o });
}

#[test]
fn release_last_reference_is_ebusy_while_locked_shm_mapped_or_fenced() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    assert_eq!(d.err(0, Request::Release { object: o }), Status::Busy);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    assert_eq!(
        d.err(0, Request::Release { object: o }),
        Status::Busy,
        "unsignalled fence"
    );
    d.ok(0, Dev::signal_req(f, 0));
    d.ok(0, Dev::map_shm_req(o, false));
    assert_eq!(
        d.err(0, Request::Release { object: o }),
        Status::Busy,
        "window mapping"
    );
    d.ok(0, Request::UnmapShm { object: o });
    d.ok(0, Request::Release { object: o });
}

#[test]
fn release_is_ebusy_while_a_request_waits_on_the_object() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    d.lock(0, c1, o);
    d.fence(0, c1, o, FenceUsage::Write);
    d.unlock(0, c1, o);
    d.park(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Write,
            timeout_ns: 1_000_000_000,
        },
    );
    assert_eq!(d.err(0, Request::Release { object: o }), Status::Busy);
}

#[test]
fn release_of_revoked_handle_succeeds_and_frees_it() {
    let mut d = Dev::new();
    export(&mut d, "gone", 1, false, false, None);
    let h = handle(open_name(&mut d, 0, "gone").unwrap());
    let a = d.attach(0, h, false);
    let now = d.now;
    d.ex.host_revoke("gone", now).unwrap();
    assert_eq!(d.err(0, Dev::map_shm_req(h, false)), Status::NoEnt);
    d.ok(0, Request::Release { object: h });
    assert_eq!(d.err(0, Request::Detach { attachment: a }), Status::NoEnt);
    assert_eq!(d.object_count(), 0);
}

#[test]
fn export_uuid_publishes_and_object_death_removes_it() {
    let mut d = Dev::new();
    let r = d.create_reply(0, 1, false);
    let Reply::Uuid(u) = d.ok(0, Request::ExportUuid { object: r.object }) else {
        panic!()
    };
    assert_eq!(u, r.uuid);
    assert_eq!(d.fe[0].lock().unwrap().added, vec![u]);
    assert!(
        d.ex.shared_object_fd(0, &u).is_some(),
        "GET_SHARED_OBJECT is answered"
    );
    assert!(
        d.ex.shared_object_fd(1, &u).is_none(),
        "not for another guest"
    );
    d.ok(0, Request::Release { object: r.object });
    assert_eq!(d.fe[0].lock().unwrap().removed, vec![u]);
}

#[test]
fn export_uuid_without_shared_objects_is_eopnotsupp() {
    let mut d = Dev::with(
        Limits::default(),
        1,
        GuestCaps {
            shm_size: 0,
            shared_objects: false,
            guest_pages: false,
        },
    );
    let o = d.create(0, 1, false, false);
    assert_eq!(
        d.err(0, Request::ExportUuid { object: o }),
        Status::NotSupported
    );
}

#[test]
fn export_uuid_of_guest_pages_without_a_kernel_dmabuf_is_eopnotsupp() {
    let mut d = Dev::new();
    let g = handle(guest_create(&mut d, PAGE, vec![Segment { addr: 0, len: PAGE }]).unwrap());
    assert_eq!(
        d.err(0, Request::ExportUuid { object: g }),
        Status::NotSupported
    );
    assert!(d.fe[0].lock().unwrap().added.is_empty());
}

#[test]
fn open_by_uuid_resolves_own_objects_locally() {
    let mut d = Dev::new();
    let r = d.create_reply(0, 1, false);
    d.ok(0, Request::ExportUuid { object: r.object });
    let got = handle(d.ok(
        0,
        Request::Open {
            uuid: Some(r.uuid),
            name: vec![],
        },
    ));
    assert_eq!(got, r.object);
    assert_eq!(
        d.err(
            1,
            Request::Open {
                uuid: Some(r.uuid),
                name: vec![]
            }
        ),
        Status::NoEnt,
        "another guest cannot see it"
    );
}

#[test]
fn open_by_uuid_of_another_device_uses_shared_object_lookup() {
    let mut d = Dev::new();
    let uuid = [7u8; 16];
    let fd = MemfdProvider::new(1 << 30)
        .allocate_memfd(2 * PAGE)
        .unwrap();
    let owned = vhost_device_dmabuf::provider::Backing::fd(&fd)
        .unwrap()
        .try_clone_to_owned()
        .unwrap();
    d.fe[0]
        .lock()
        .unwrap()
        .lookups
        .push((uuid, Arc::new(owned)));
    let Reply::Object(o) = d.ok(
        0,
        Request::Open {
            uuid: Some(uuid),
            name: vec![],
        },
    ) else {
        panic!()
    };
    assert_eq!((o.size, o.uuid), (2 * PAGE, uuid));
    let again = handle(d.ok(
        0,
        Request::Open {
            uuid: Some(uuid),
            name: vec![],
        },
    ));
    assert_eq!(again, o.object, "second open resolves locally");
}

// fds: small host objects are extents of slabs, everything that hands an
// fd out promotes them first, and the objects with fds of their own are
// counted against `max_fd_objects` (`objects.rs`, "fds").

/// Pages of the largest object that is an extent of a slab (1 MiB).
const SLAB_PAGES: u64 = 256;

fn info_of(d: &Dev, uuid: &[u8; 16]) -> vhost_device_dmabuf::exporter::ObjectInfo {
    d.ex.list()
        .into_iter()
        .find(|o| o.uuid.as_bytes() == uuid)
        .expect("listed")
}

fn bytes_of(d: &mut Dev, object: u64, len: u64) -> Vec<u8> {
    match d.ok(
        0,
        Request::TransferFromHost {
            object,
            offset: 0,
            len,
        },
    ) {
        Reply::Data(data) => data,
        r => panic!("{r:?}"),
    }
}

fn write(d: &mut Dev, object: u64, data: &[u8]) {
    d.ok(
        0,
        Request::TransferToHost {
            object,
            offset: 0,
            data: data.to_vec(),
        },
    );
}

#[test]
fn small_host_objects_are_extents_and_large_ones_have_fds() {
    let mut d = Dev::new();
    let small = d.create_reply(0, SLAB_PAGES, false);
    let large = d.create_reply(0, SLAB_PAGES + 1, false);
    assert!(info_of(&d, &small.uuid).sub_allocated);
    assert!(!info_of(&d, &large.uuid).sub_allocated);
    assert_eq!(info_of(&d, &small.uuid).provider, "memfd");
}

#[test]
fn a_released_extent_is_handed_out_again_zero_filled() {
    let mut d = Dev::new();
    let a = d.create(0, 2, false, false);
    write(&mut d, a, &[0xa5; 2 * PAGE as usize]);
    d.ok(0, Request::Release { object: a });
    let b = d.create(0, 2, false, false);
    assert!(bytes_of(&mut d, b, 2 * PAGE).iter().all(|&x| x == 0));
}

#[test]
fn map_shm_promotes_an_extent_and_keeps_its_bytes() {
    let mut d = Dev::new();
    let o = d.create_reply(0, 2, false);
    let data: Vec<u8> = (0..2 * PAGE).map(|i| (i % 251) as u8).collect();
    write(&mut d, o.object, &data);
    d.ok(0, Dev::map_shm_req(o.object, true));
    assert!(!info_of(&d, &o.uuid).sub_allocated, "a memfd of its own");
    assert_eq!(bytes_of(&mut d, o.object, 2 * PAGE), data);
    // The handle, the generation and the window placement are the guest's
    // as before.
    let info = info_of(&d, &o.uuid);
    assert_eq!((info.generation, info.shm_offset), (0, Some(0)));
}

#[test]
fn export_uuid_promotes_an_extent_before_publishing_it() {
    let mut d = Dev::new();
    let o = d.create_reply(0, 1, false);
    write(&mut d, o.object, b"published");
    d.ok(0, Request::ExportUuid { object: o.object });
    assert!(!info_of(&d, &o.uuid).sub_allocated);
    let fd =
        d.ex.shared_object_fd(0, &o.uuid)
            .expect("the object's own fd");
    let mut head = [0u8; 9];
    rustix::io::pread(&fd, &mut head, 0).expect("pread");
    assert_eq!(&head, b"published");
}

#[test]
fn create_of_a_large_object_past_the_fd_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_fd_objects: 2,
        ..Limits::default()
    });
    let first = d.create(0, SLAB_PAGES + 1, false, false);
    d.create(0, SLAB_PAGES + 1, false, false);
    let large = Request::Create {
        size: (SLAB_PAGES + 1) * PAGE,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    assert_eq!(d.err(0, large.clone()), Status::NoSpc);
    // Small objects hold no fd; the other guest has a quota of its own.
    d.create(0, 1, false, false);
    d.ok(1, large.clone());
    // The charge goes with the object.
    d.ok(0, Request::Release { object: first });
    d.ok(0, large);
}

#[test]
fn promotion_past_the_fd_quota_is_enospc_and_leaves_the_extent() {
    let mut d = Dev::with_limits(Limits {
        max_fd_objects: 1,
        ..Limits::default()
    });
    let a = d.create(0, 1, false, false);
    let b = d.create_reply(0, 1, false);
    write(&mut d, b.object, b"kept");
    d.ok(0, Dev::map_shm_req(a, false));
    assert_eq!(d.err(0, Dev::map_shm_req(b.object, false)), Status::NoSpc);
    assert_eq!(
        d.err(0, Request::ExportUuid { object: b.object }),
        Status::NoSpc
    );
    assert!(info_of(&d, &b.uuid).sub_allocated);
    assert_eq!(&bytes_of(&mut d, b.object, 4), b"kept");
    assert!(
        d.fe[0].lock().unwrap().added.is_empty(),
        "nothing published"
    );
    // Out of the window, the promoted object keeps its memfd and its
    // charge until it dies.
    d.ok(0, Request::UnmapShm { object: a });
    assert_eq!(d.err(0, Dev::map_shm_req(b.object, false)), Status::NoSpc);
    d.ok(0, Request::Release { object: a });
    d.ok(0, Dev::map_shm_req(b.object, false));
}

#[test]
fn reset_gives_back_every_fd_charge() {
    let mut d = Dev::with_limits(Limits {
        max_fd_objects: 1,
        ..Limits::default()
    });
    let a = d.create(0, 1, false, false);
    d.ok(0, Dev::map_shm_req(a, true));
    d.ok(0, Request::ResetSession);
    assert_eq!(d.object_count(), 0);
    d.create(0, SLAB_PAGES + 1, false, false);
}

#[test]
fn evicting_an_extent_moves_it_to_another_extent() {
    let mut d = Dev::new();
    let o = d.create_reply(0, 1, true);
    write(&mut d, o.object, b"moved");
    let uuid = uuid::Uuid::from_bytes(o.uuid);
    assert_eq!(d.evict(uuid, 1), Some(Ok(())));
    let info = info_of(&d, &o.uuid);
    assert_eq!(info.generation, 1);
    assert!(info.sub_allocated, "no fd is needed where it lands");
    assert_eq!(&bytes_of(&mut d, o.object, 5), b"moved");
}

#[test]
fn evicting_a_promoted_object_keeps_its_window_on_a_memfd() {
    let mut d = Dev::new();
    let o = d.create_reply(0, 1, true);
    d.ok(0, Dev::map_shm_req(o.object, true));
    assert_eq!(d.evict(uuid::Uuid::from_bytes(o.uuid), 1), Some(Ok(())));
    let info = info_of(&d, &o.uuid);
    assert!(!info.sub_allocated);
    assert_eq!(info.shm_offset, Some(0));
    let log = d.fe[0].lock().unwrap();
    assert_eq!(
        log.shm_maps.len(),
        2,
        "placed, then placed again after the move"
    );
}
