//! One test per rule of the contract's sections 6 to 9, against the
//! exporter core with the real memfd provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vhost_device_dmabuf::exporter::{ExportSpec, GuestCaps, HostError, Limits};
use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
use virtio_dmabuf_protocol::*;

use Direction::{Bidirectional as Bidi, FromDevice, ToDevice};

const START_READ: u64 = 0x1;
const START_WRITE: u64 = 0x2;
const START_RW: u64 = 0x3;
const END_READ: u64 = 0x5;
const END_WRITE: u64 = 0x6;
const END_RW: u64 = 0x7;

fn export(
    dev: &mut Dev,
    name: &str,
    pages: u64,
    dynamic: bool,
    read_only: bool,
    guests: Option<Vec<usize>>,
) -> uuid::Uuid {
    let backing = MemfdProvider::new(1 << 30).allocate(pages * PAGE).unwrap();
    dev.ex
        .host_export(
            ExportSpec {
                name: name.into(),
                dynamic,
                read_only,
                guests,
            },
            backing,
        )
        .unwrap()
}

fn open_name(dev: &mut Dev, guest: usize, name: &str) -> Response {
    dev.call(
        guest,
        Request::Open {
            uuid: None,
            name: name.as_bytes().to_vec(),
        },
    )
}

fn handle(r: Reply) -> u64 {
    match r {
        Reply::Object(o) => o.object,
        r => panic!("{r:?}"),
    }
}

fn uuid_of(dev: &Dev, index: usize) -> uuid::Uuid {
    dev.ex.list()[index].uuid
}

// ---- Section 6: model ----

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
fn stamps_come_from_one_counter_shared_by_all_guests() {
    let mut d = Dev::new();
    let (_, s1) = d.ctx(0);
    let (_, s2) = d.ctx(1);
    let (_, s3) = d.ctx(0);
    assert!(s1 < s2 && s2 < s3);
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

// ---- Section 7.1: session ----

#[test]
fn get_info_reports_live_caps_and_quotas() {
    let mut d = Dev::new();
    let Reply::Info(i) = d.ok(0, Request::GetInfo) else {
        panic!()
    };
    assert_eq!(i.version, 1);
    assert_eq!(i.caps & caps::HOST_SHM, caps::HOST_SHM);
    assert_eq!(i.caps & caps::SHARED_OBJECTS, caps::SHARED_OBJECTS);
    assert_eq!(
        i.caps & caps::REAL_DMABUF,
        0,
        "memfd makes no kernel dma-bufs"
    );
    assert_eq!(i.provider, ProviderKind::Memfd as u32);
    assert_eq!(i.shm_size, 64 * PAGE);
    assert_eq!(i.max_objects, Limits::default().max_objects);
    assert_eq!(i.num_queues, 3);
}

#[test]
fn get_info_without_shmem_or_shared_objects_reports_them_off() {
    let mut d = Dev::with(Limits::default(), 1, GuestCaps::default());
    let Reply::Info(i) = d.ok(0, Request::GetInfo) else {
        panic!()
    };
    assert_eq!(
        i.caps & (caps::HOST_SHM | caps::SHARED_OBJECTS | caps::GUEST_PAGES),
        0
    );
    assert_eq!(i.shm_size, 0);
}

#[test]
fn reset_session_releases_everything_the_guest_held() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.map(0, a, Bidi, ctx);
    d.fence(0, ctx, o, FenceUsage::Write);
    d.ok(0, Dev::map_shm_req(o, true));
    d.ok(0, Request::ResetSession);
    assert_eq!(d.object_count(), 0, "no object left");
    assert_eq!(
        d.fe[0].lock().unwrap().shm_unmaps.len(),
        1,
        "window mapping removed"
    );
    assert_eq!(d.err(0, Request::Release { object: o }), Status::NoEnt);
}

#[test]
fn cancel_ends_the_waiting_request_with_that_tag() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, o);
    let t = d.park(0, Dev::lock_req(c2, o));
    d.ok(0, Request::Cancel { tag: t });
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
}

#[test]
fn cancel_of_unknown_tag_is_enoent() {
    let mut d = Dev::new();
    assert_eq!(d.err(0, Request::Cancel { tag: 12345 }), Status::NoEnt);
}

#[test]
fn vring_stop_cancels_that_queues_waiters_and_keeps_state() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    let (c3, _) = d.ctx(0);
    d.lock(0, c1, o);
    let (t2, r) = d.submit_on(0, 2, Dev::lock_req(c2, o));
    assert!(r.is_none());
    let (t3, r) = d.submit_on(0, 0, Dev::lock_req(c3, o));
    assert!(r.is_none());
    let now = d.now;
    d.ex.cancel_queue(0, 2, now);
    let done = d.completions();
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].origin.token, done[0].response.clone()),
        (t2, Err(Status::Canceled))
    );
    d.unlock(0, c1, o);
    assert_eq!(
        d.completed(t3),
        Some(Ok(Reply::Empty)),
        "the other queue's waiter is granted"
    );
}

// ---- Section 7.2: objects ----

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

fn guest_create(d: &mut Dev, size: u64, entries: Vec<Segment>) -> Response {
    d.call(
        0,
        Request::Create {
            size,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(entries),
        },
    )
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

// ---- Section 7.3: attachments ----

#[test]
fn attach_when_importer_and_exporter_agree_maps_nothing() {
    let mut d = Dev::new();
    let s = d.create(0, 1, false, false);
    let dy = d.create(0, 1, true, false);
    let mark = d.sync_mark();
    d.attach(0, s, false);
    d.attach(0, dy, true);
    assert!(d.syncs_since(mark).is_empty());
    assert!(d
        .ex
        .list()
        .iter()
        .all(|o| o.attachments[0].cached_dir.is_none()));
}

#[test]
fn attach_static_importer_to_dynamic_exporter_caches_bidirectional_and_pins() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let mark = d.sync_mark();
    d.attach(0, o, false);
    assert_eq!(
        d.syncs_since(mark),
        vec![END_RW],
        "attach-time mapping is made now"
    );
    let info = &d.ex.list()[0].attachments[0];
    assert_eq!((info.cached_dir, info.pins), (Some(0), 1));
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Err(HostError::Pinned)));
}

#[test]
fn attach_dynamic_importer_to_static_exporter_caches_bidirectional_without_pin() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    d.attach(0, o, true);
    let info = &d.ex.list()[0].attachments[0];
    assert_eq!((info.cached_dir, info.pins), (Some(0), 0));
}

#[test]
fn attach_parks_while_another_context_holds_the_lock() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let t = d.park(
        0,
        Request::Attach {
            object: o,
            dynamic_importer: false,
            peer2peer: false,
        },
    );
    d.unlock(0, ctx, o);
    assert!(matches!(d.completed(t), Some(Ok(Reply::Attachment(_)))));
}

#[test]
fn map_cached_bidirectional_serves_every_direction_with_sync_for_device() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, false);
    for (dir, flags) in [
        (ToDevice, END_WRITE),
        (FromDevice, END_READ),
        (Bidi, END_RW),
    ] {
        let mark = d.sync_mark();
        let m = d.map(0, a, dir, 0);
        assert_eq!(m.map_flags & map_flags::CACHED, map_flags::CACHED);
        assert_eq!(d.syncs_since(mark), vec![flags], "{dir:?}");
        d.unmap(0, m.mapping);
    }
}

#[test]
fn unmap_of_cached_mapping_syncs_for_cpu_and_keeps_the_cache() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, false);
    let m = d.map(0, a, FromDevice, 0);
    let mark = d.sync_mark();
    d.unmap(0, m.mapping);
    assert_eq!(d.syncs_since(mark), vec![START_READ]);
    assert_eq!(d.ex.list()[0].attachments[0].cached_dir, Some(0));
}

#[test]
fn cache_mapping_caches_the_first_mapping_with_its_direction() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, true);
    let a = d.attach(0, o, false);
    let m = d.map(0, a, ToDevice, 0);
    assert_eq!(
        d.ex.list()[0].attachments[0].cached_dir,
        Some(ToDevice as u32)
    );
    assert_eq!(m.map_flags & map_flags::CACHED, map_flags::CACHED);
    d.unmap(0, m.mapping);
    d.map(0, a, ToDevice, 0);
}

#[test]
fn map_cached_other_direction_is_ebusy() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, true);
    let a = d.attach(0, o, false);
    d.map(0, a, ToDevice, 0);
    let mark = d.sync_mark();
    assert_eq!(d.err(0, Dev::map_req(a, FromDevice, 0)), Status::Busy);
    assert_eq!(d.err(0, Dev::map_req(a, Bidi, 0)), Status::Busy);
    assert!(
        d.syncs_since(mark).is_empty(),
        "a refused map syncs nothing"
    );
}

#[test]
fn fresh_map_and_unmap_sync_like_the_dma_api() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let mark = d.sync_mark();
    let m = d.map(0, a, FromDevice, 0);
    assert_eq!(m.map_flags & map_flags::CACHED, 0);
    d.unmap(0, m.mapping);
    assert_eq!(d.syncs_since(mark), vec![END_READ, START_READ]);
}

#[test]
fn map_by_dynamic_importer_without_the_lock_is_eperm() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    assert_eq!(d.err(0, Dev::map_req(a, Bidi, ctx)), Status::Perm);
    d.lock(0, ctx, o);
    d.map(0, a, Bidi, ctx);
}

#[test]
fn map_by_dynamic_importer_with_ctx_zero_takes_the_lock_itself() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let t = d.park(0, Dev::map_req(a, Bidi, 0));
    d.unlock(0, ctx, o);
    assert!(matches!(d.completed(t), Some(Ok(Reply::Map(_)))));
    assert!(
        d.ex.list()[0].lock_holder.is_none(),
        "the device released it"
    );
}

#[test]
fn map_by_static_importer_with_a_context_is_einval() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    assert_eq!(d.err(0, Dev::map_req(a, Bidi, ctx)), Status::Inval);
}

#[test]
fn map_by_static_importer_waits_for_kernel_fences() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let k = d.fence(0, ctx, o, FenceUsage::Kernel);
    d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let t = d.park(0, Dev::map_req(a, ToDevice, 0));
    d.ok(0, Dev::signal_req(k, 0));
    assert!(
        matches!(d.completed(t), Some(Ok(Reply::Map(_)))),
        "WRITE fences do not block it"
    );
}

#[test]
fn map_with_too_few_entries_is_eoverflow_with_needed_count() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let r = d.call(
        0,
        Request::Map {
            attachment: a,
            dir: Bidi,
            max_entries: 0,
            ctx: 0,
        },
    );
    assert_eq!(r, Ok(Reply::MapOverflow { needed: 1 }));
    assert_eq!(d.ex.list()[0].attachments[0].mappings, 0, "no mapping made");
}

#[test]
fn map_reports_object_shm_and_guest_phys_spaces() {
    let mut d = Dev::new();
    let o = d.create(0, 2, false, false);
    let plain = d.attach(0, o, false);
    let p2p = d.attach_p2p(0, o, false, true);
    assert_eq!(d.map(0, plain, Bidi, 0).space, AddressSpace::Object);
    assert_eq!(
        d.map(0, p2p, Bidi, 0).space,
        AddressSpace::Object,
        "MAP never calls MAP_SHM"
    );
    let Reply::Shm { shm_offset, .. } = d.ok(0, Dev::map_shm_req(o, false)) else {
        panic!()
    };
    let m = d.map(0, p2p, Bidi, 0);
    assert_eq!(
        (m.space, m.entries[0].addr, m.entries[0].len),
        (AddressSpace::Shm, shm_offset, 2 * PAGE)
    );
    assert_eq!(
        d.map(0, plain, Bidi, 0).space,
        AddressSpace::Object,
        "only PEER2PEER importers get SHM"
    );
    let pages = vec![
        Segment {
            addr: 0x20000,
            len: PAGE,
        },
        Segment {
            addr: 0x80000,
            len: PAGE,
        },
    ];
    let g = handle(guest_create(&mut d, 2 * PAGE, pages.clone()).unwrap());
    let ga = d.attach(0, g, false);
    let m = d.map(0, ga, Bidi, 0);
    assert_eq!((m.space, m.entries), (AddressSpace::GuestPhys, pages));
}

#[test]
fn detach_is_ebusy_while_a_mapping_is_outstanding() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let m = d.map(0, a, Bidi, 0);
    assert_eq!(d.err(0, Request::Detach { attachment: a }), Status::Busy);
    d.unmap(0, m.mapping);
    d.ok(0, Request::Detach { attachment: a });
}

#[test]
fn detach_drops_the_cached_mapping_and_its_pin() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, false);
    let mark = d.sync_mark();
    d.ok(0, Request::Detach { attachment: a });
    assert_eq!(d.syncs_since(mark), vec![START_RW]);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
}

#[test]
fn pin_by_static_importer_is_einval() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, false);
    assert_eq!(d.err(0, Dev::pin_req(a, 0, true)), Status::Inval);
}

#[test]
fn pin_on_static_exporter_is_a_noop_that_never_fails() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, true);
    d.ok(0, Dev::pin_req(a, 0, false));
    d.ok(0, Dev::pin_req(a, 0, true));
    assert_eq!(d.ex.list()[0].attachments[0].pins, 0);
}

#[test]
fn unpin_below_zero_is_einval() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    assert_eq!(d.err(0, Dev::pin_req(a, 0, false)), Status::Inval);
}

#[test]
fn pins_count_per_attachment_and_block_moves() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.ok(0, Request::Pin { attachment: a, ctx });
    d.ok(0, Request::Pin { attachment: a, ctx });
    let m = d.map(0, a, Bidi, ctx);
    assert_eq!(m.map_flags & map_flags::PINNED, map_flags::PINNED);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Err(HostError::Pinned)));
    d.ok(0, Dev::pin_req(a, 0, false));
    assert_eq!(d.evict(u, 2), Some(Err(HostError::Pinned)));
    d.ok(0, Dev::pin_req(a, 0, false));
    assert_eq!(d.evict(u, 3), Some(Ok(())));
}

#[test]
fn pin_by_dynamic_importer_needs_the_lock() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    assert_eq!(d.err(0, Request::Pin { attachment: a, ctx }), Status::Perm);
}

#[test]
fn attachment_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_attachments: 1,
        ..Limits::default()
    });
    let o = d.create(0, 1, false, false);
    d.attach(0, o, false);
    assert_eq!(
        d.err(
            0,
            Request::Attach {
                object: o,
                dynamic_importer: false,
                peer2peer: false
            }
        ),
        Status::NoSpc
    );
}

// ---- Section 7.4: reservation lock ----

#[test]
fn lock_free_is_granted_and_held_by_self_is_ealready() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, stamp) = d.ctx(0);
    d.lock(0, ctx, o);
    assert_eq!(d.err(0, Dev::lock_req(ctx, o)), Status::Already);
    let holder = d.ex.list()[0].lock_holder.clone().unwrap();
    assert_eq!((holder.guest, holder.stamp), (Some(0), Some(stamp)));
}

#[test]
fn try_lock_held_by_another_is_ebusy_at_once() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, o);
    assert_eq!(
        d.err(
            0,
            Request::Lock {
                ctx: c2,
                object: o,
                try_lock: true,
                slow: false
            }
        ),
        Status::Busy
    );
}

#[test]
fn slow_lock_while_holding_any_lock_is_einval() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, a);
    assert_eq!(
        d.err(
            0,
            Request::Lock {
                ctx,
                object: b,
                try_lock: false,
                slow: true
            }
        ),
        Status::Inval
    );
}

#[test]
fn younger_context_holding_a_lock_gets_edeadlk_at_once() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    d.lock(0, young, b);
    assert_eq!(d.err(0, Dev::lock_req(young, a)), Status::Deadlk);
    // The older one waits for the younger instead.
    let t = d.park(0, Dev::lock_req(old, b));
    d.unlock(0, young, b);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
}

#[test]
fn context_holding_no_lock_waits_and_never_gets_edeadlk() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    let t = d.park(0, Dev::lock_req(young, a));
    d.unlock(0, old, a);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
}

#[test]
fn waiting_contexts_are_granted_oldest_stamp_first() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (holder, _) = d.ctx(0);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, holder, a);
    let t2 = d.park(0, Dev::lock_req(c2, a));
    let t1 = d.park(0, Dev::lock_req(c1, a));
    d.unlock(0, holder, a);
    assert_eq!(d.completed(t1), Some(Ok(Reply::Empty)), "older first");
    d.unlock(0, c1, a);
    assert_eq!(d.completed(t2), Some(Ok(Reply::Empty)));
}

#[test]
fn waiting_younger_context_with_locks_dies_when_an_older_one_queues() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let c = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (mid, _) = d.ctx(0);
    let (holder, _) = d.ctx(0);
    let (x, _) = d.ctx(1);
    let _ = x;
    // The holder is the youngest, so `mid` (holding b) may wait for it.
    d.lock(0, holder, a);
    d.lock(0, mid, b);
    let tm = d.park(0, Dev::lock_req(mid, a));
    d.lock(0, old, c);
    // An older context with a lock queues ahead: mid must back off now.
    let to = d.park(0, Dev::lock_req(old, a));
    assert_eq!(d.completed(tm), Some(Err(Status::Deadlk)));
    d.unlock(0, holder, a);
    assert_eq!(d.completed(to), Some(Ok(Reply::Empty)));
}

#[test]
fn contexts_belong_to_the_guest_that_made_them() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (foreign, _) = d.ctx(1);
    assert_eq!(d.err(0, Dev::lock_req(foreign, a)), Status::NoEnt);
    assert_eq!(
        d.err(1, Dev::lock_req(foreign, a)),
        Status::NoEnt,
        "and objects to theirs"
    );
}

#[test]
fn wait_die_backoff_and_slow_relock_with_two_contexts() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (old, _) = d.ctx(0);
    let (young, _) = d.ctx(0);
    d.lock(0, old, a);
    d.lock(0, young, b);
    let t_old = d.park(0, Dev::lock_req(old, b));
    assert_eq!(d.err(0, Dev::lock_req(young, a)), Status::Deadlk);
    // Back off: drop everything, then SLOW on the contended object.
    d.unlock(0, young, b);
    assert_eq!(d.completed(t_old), Some(Ok(Reply::Empty)));
    let t_slow = d.park(
        0,
        Request::Lock {
            ctx: young,
            object: a,
            try_lock: false,
            slow: true,
        },
    );
    d.unlock(0, old, a);
    d.unlock(0, old, b);
    assert_eq!(d.completed(t_slow), Some(Ok(Reply::Empty)));
    d.lock(0, young, b);
}

#[test]
fn three_contexts_resolve_by_wait_die() {
    let mut d = Dev::new();
    let objs: Vec<u64> = (0..3).map(|_| d.create(0, 1, false, false)).collect();
    let ctxs: Vec<u64> = (0..3).map(|_| d.ctx(0).0).collect();
    // Each holds its own object and wants the next one: a cycle.
    for i in 0..3 {
        d.lock(0, ctxs[i], objs[i]);
    }
    let t0 = d.park(0, Dev::lock_req(ctxs[0], objs[1]));
    let t1 = d.park(0, Dev::lock_req(ctxs[1], objs[2]));
    assert_eq!(
        d.err(0, Dev::lock_req(ctxs[2], objs[0])),
        Status::Deadlk,
        "the youngest dies"
    );
    d.unlock(0, ctxs[2], objs[2]);
    assert_eq!(d.completed(t1), Some(Ok(Reply::Empty)));
    d.unlock(0, ctxs[1], objs[1]);
    d.unlock(0, ctxs[1], objs[2]);
    assert_eq!(d.completed(t0), Some(Ok(Reply::Empty)));
}

#[test]
fn second_request_naming_a_waiting_context_is_ebusy() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let b = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    d.park(0, Dev::lock_req(c2, a));
    assert_eq!(d.err(0, Dev::lock_req(c2, b)), Status::Busy);
}

#[test]
fn unlock_of_a_lock_not_held_is_eperm() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    assert_eq!(
        d.err(0, Request::Unlock { ctx: c2, object: a }),
        Status::Perm
    );
}

#[test]
fn acquire_fini_is_ebusy_while_holding_and_cancels_its_waiter() {
    let mut d = Dev::new();
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, a);
    assert_eq!(d.err(0, Request::AcquireFini { ctx: c1 }), Status::Busy);
    let t = d.park(0, Dev::lock_req(c2, a));
    d.ok(0, Request::AcquireFini { ctx: c2 });
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
    assert_eq!(d.err(0, Dev::lock_req(c2, a)), Status::NoEnt);
}

#[test]
fn context_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_contexts: 1,
        ..Limits::default()
    });
    d.ctx(0);
    assert_eq!(d.err(0, Request::AcquireInit), Status::NoSpc);
}

#[test]
fn waiting_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_waiting: 1,
        ..Limits::default()
    });
    let a = d.create(0, 1, false, false);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    let (c3, _) = d.ctx(0);
    d.lock(0, c1, a);
    d.park(0, Dev::lock_req(c2, a));
    assert_eq!(d.err(0, Dev::lock_req(c3, a)), Status::NoSpc);
}

// ---- Section 7.5 and 9: CPU access and host syncs ----

#[test]
fn begin_cpu_access_issues_start_with_direction_bits() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let mark = d.sync_mark();
    for dir in [FromDevice, ToDevice, Bidi] {
        d.ok(0, Request::BeginCpuAccess { object: o, dir });
    }
    assert_eq!(d.syncs_since(mark), vec![START_READ, START_WRITE, START_RW]);
}

#[test]
fn end_cpu_access_issues_end_with_direction_bits() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let mark = d.sync_mark();
    for dir in [FromDevice, ToDevice, Bidi] {
        d.ok(0, Request::EndCpuAccess { object: o, dir });
    }
    assert_eq!(d.syncs_since(mark), vec![END_READ, END_WRITE, END_RW]);
}

#[test]
fn ctl_stats_counts_syncs_by_flags_and_lists_recent_ones() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    d.ok(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    d.ok(
        0,
        Request::EndCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    let s = d.ex.stats();
    assert_eq!(s.syncs.get("START|READ"), Some(&1));
    assert_eq!(s.syncs.get("END|READ"), Some(&1));
    assert_eq!(s.recent_syncs.len(), 2);
    // memfd objects: the emulation answered, and it said yes.
    assert!(s
        .recent_syncs
        .iter()
        .all(|e| !e.kernel && e.errno.is_none()));
    assert_eq!(s.requests["BEGIN_CPU_ACCESS"]["OK"], 1);
}

#[test]
fn refused_host_sync_is_eio_and_recorded_with_the_kernel_errno() {
    // A host fd taken as a kernel dma-buf that is none (a memfd): the real
    // ioctl reaches the kernel, which answers ENOTTY.
    let mut d = Dev::new();
    let fd = rustix::fs::memfd_create("not-a-dmabuf", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, PAGE).unwrap();
    let backing = vhost_device_dmabuf::provider::import_dmabuf(fd).unwrap();
    let uuid =
        d.ex.host_export(
            ExportSpec {
                name: "fake".into(),
                dynamic: false,
                read_only: false,
                guests: None,
            },
            backing,
        )
        .unwrap();
    let o = handle(open_name(&mut d, 0, "fake").unwrap());
    let r = d.err(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    assert_eq!(r, Status::Io);
    let s = d.ex.stats();
    let last = s.recent_syncs.last().copied().unwrap();
    assert_eq!(
        (last.uuid, last.flags, last.kernel, last.errno),
        (uuid, START_READ, true, Some(libc::ENOTTY))
    );
    assert_eq!(s.syncs.get("START|READ"), None, "only answered calls count");
}

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

// ---- Section 7.6: fences ----

#[test]
fn fence_attach_without_the_lock_is_eperm() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    assert_eq!(
        d.err(
            0,
            Request::FenceAttach {
                ctx,
                object: o,
                usage: FenceUsage::Write,
                host: false,
            }
        ),
        Status::Perm
    );
}

#[test]
fn fence_signal_only_by_its_creator() {
    let mut d = Dev::new();
    export(&mut d, "shared", 1, false, false, None);
    let h0 = handle(open_name(&mut d, 0, "shared").unwrap());
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, h0);
    let f = d.fence(0, ctx, h0, FenceUsage::Write);
    assert_eq!(d.err(1, Dev::signal_req(f, 0)), Status::NoEnt);
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(
        d.err(0, Dev::signal_req(f, 0)),
        Status::NoEnt,
        "signalled once"
    );
}

#[test]
fn wait_completes_when_every_fence_up_to_usage_is_signalled() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let k = d.fence(0, ctx, o, FenceUsage::Kernel);
    let b = d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Read,
            timeout_ns: 5_000_000_000,
        },
    );
    d.ok(0, Dev::signal_req(k, 5));
    assert_eq!(
        d.completed(t),
        Some(Ok(Reply::Empty)),
        "BOOKKEEP is above READ"
    );
    assert_eq!(
        d.err(
            0,
            Request::Wait {
                object: o,
                usage: FenceUsage::Bookkeep,
                timeout_ns: 0
            }
        ),
        Status::TimedOut,
        "0 polls"
    );
    d.ok(0, Dev::signal_req(b, 0));
    d.ok(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Bookkeep,
            timeout_ns: 0,
        },
    );
}

#[test]
fn wait_times_out_with_etimedout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Write);
    let t = d.park(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Write,
            timeout_ns: 1_000_000,
        },
    );
    assert!(d.ex.next_deadline().unwrap() <= d.now + Duration::from_millis(1));
    d.advance(Duration::from_millis(2));
    assert_eq!(d.completed(t), Some(Err(Status::TimedOut)));
}

#[test]
fn unsignalled_fence_times_out_after_fence_timeout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    d.advance(Duration::from_secs(11));
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)), "the waiter goes on");
    assert_eq!(d.err(0, Dev::signal_req(f, 0)), Status::TimedOut);
}

#[test]
fn fence_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_fences: 1,
        ..Limits::default()
    });
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Write);
    assert_eq!(
        d.err(
            0,
            Request::FenceAttach {
                ctx,
                object: o,
                usage: FenceUsage::Write,
                host: false,
            }
        ),
        Status::NoSpc
    );
}

// ---- Section 8: moves, revokes, events ----

#[test]
fn evict_moves_bytes_bumps_generation_and_notifies_dynamic_importers() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    d.ok(
        0,
        Request::TransferToHost {
            object: o,
            offset: 10,
            data: b"hello".to_vec(),
        },
    );
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let m = d.map(0, a, Bidi, ctx);
    assert_eq!((m.generation, m.map_flags & map_flags::PINNED), (0, 0));
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    let e = d.ex.pop_event(0).unwrap();
    assert_eq!(
        (e.kind, e.object, e.attachment, e.data),
        (EventType::MoveNotify, o, a, 1)
    );
    let mark = d.sync_mark();
    d.unmap(0, m.mapping);
    assert!(
        d.syncs_since(mark).is_empty(),
        "an invalidated mapping unmaps with no sync"
    );
    assert_eq!(d.map(0, a, Bidi, 0).generation, 1);
    assert_eq!(
        d.ok(
            0,
            Request::TransferFromHost {
                object: o,
                offset: 10,
                len: 5
            }
        ),
        Reply::Data(b"hello".to_vec())
    );
}

#[test]
fn evict_keeps_the_window_offset() {
    let mut d = Dev::new();
    let pad = d.create(0, 1, false, false);
    d.ok(0, Dev::map_shm_req(pad, false));
    let o = d.create(0, 1, true, false);
    let Reply::Shm { shm_offset, .. } = d.ok(0, Dev::map_shm_req(o, true)) else {
        panic!()
    };
    let u = uuid_of(&d, 1);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    let log = d.fe[0].lock().unwrap();
    assert_eq!(log.shm_unmaps.last(), Some(&(shm_offset, PAGE)));
    assert_eq!(log.shm_maps.last(), Some(&(shm_offset, PAGE, true)));
}

#[test]
fn evict_of_static_exporter_is_refused() {
    let mut d = Dev::new();
    d.create(0, 1, false, false);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Err(HostError::NotDynamic)));
}

#[test]
fn evict_waits_for_the_lock_and_gives_up_after_its_timeout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let u = uuid_of(&d, 0);
    let now = d.now;
    assert_eq!(d.ex.host_evict(u, 7, Duration::from_millis(100), now), None);
    d.advance(Duration::from_millis(150));
    assert_eq!(
        d.ex.take_host_completions(),
        vec![(7, Err(HostError::LockTimeout))]
    );
    // A second try gets the lock once it is released, as a context-less waiter.
    assert_eq!(d.evict(u, 8), None);
    d.unlock(0, ctx, o);
    assert_eq!(d.ex.take_host_completions(), vec![(8, Ok(()))]);
}

#[test]
fn evict_waits_for_every_fence_before_moving() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    assert!(
        d.ex.list()[0].lock_holder.is_some(),
        "the mover holds the lock while it waits"
    );
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(d.ex.take_host_completions(), vec![(1, Ok(()))]);
    assert_eq!(d.ex.list()[0].generation, 1);
}

#[test]
fn revoke_fails_handles_cancels_waiters_drops_locks_and_sends_revoked() {
    let mut d = Dev::new();
    export(&mut d, "cam", 1, false, false, None);
    let h = handle(open_name(&mut d, 0, "cam").unwrap());
    let a = d.attach(0, h, false);
    let m = d.map(0, a, Bidi, 0);
    let (c1, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c1, h);
    let t = d.park(0, Dev::lock_req(c2, h));
    d.ok(0, Dev::map_shm_req(h, false));
    let now = d.now;
    d.ex.host_revoke("cam", now).unwrap();
    assert_eq!(d.completed(t), Some(Err(Status::Canceled)));
    let e = d.ex.pop_event(0).unwrap();
    assert_eq!((e.kind, e.object), (EventType::Revoked, h));
    assert_eq!(
        d.err(
            0,
            Request::BeginCpuAccess {
                object: h,
                dir: Bidi
            }
        ),
        Status::NoEnt
    );
    assert_eq!(d.err(0, Dev::lock_req(c2, h)), Status::NoEnt);
    assert_eq!(
        d.fe[0].lock().unwrap().shm_unmaps.len(),
        1,
        "window mapping gone"
    );
    d.unmap(0, m.mapping);
    d.ok(0, Request::AcquireFini { ctx: c1 });
    assert_eq!(open_name(&mut d, 1, "cam"), Err(Status::NoEnt));
}

#[test]
fn events_beyond_the_pending_limit_become_one_overflow() {
    let mut d = Dev::with_limits(Limits {
        max_pending_events: 2,
        ..Limits::default()
    });
    let mut atts = Vec::new();
    for _ in 0..4 {
        let o = d.create(0, 1, true, false);
        atts.push(d.attach(0, o, true));
    }
    let uuids: Vec<_> = d.ex.list().iter().map(|o| o.uuid).collect();
    let now = d.now;
    for (i, u) in uuids.into_iter().enumerate() {
        assert_eq!(
            d.ex.host_evict(u, i as u64, Duration::from_secs(1), now),
            Some(Ok(()))
        );
    }
    let kinds: Vec<(EventType, u64)> = std::iter::from_fn(|| d.ex.pop_event(0))
        .map(|e| (e.kind, e.data))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventType::MoveNotify, 1),
            (EventType::MoveNotify, 1),
            (EventType::Overflow, 2)
        ]
    );
}

// ---- Section 6: lifetimes across guests ----

#[test]
fn reset_of_one_guest_lets_the_other_guest_proceed() {
    let mut d = Dev::new();
    export(&mut d, "both", 1, false, false, None);
    let h0 = handle(open_name(&mut d, 0, "both").unwrap());
    let h1 = handle(open_name(&mut d, 1, "both").unwrap());
    let (c0, _) = d.ctx(0);
    let (c1, _) = d.ctx(1);
    d.lock(0, c0, h0);
    let t = d.park(1, Dev::lock_req(c1, h1));
    let now = d.now;
    d.ex.disconnect(0, now);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
}

#[test]
fn guests_cannot_name_each_others_handles() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let a = d.attach(0, o, false);
    let (ctx, _) = d.ctx(0);
    assert_eq!(d.err(1, Request::Release { object: o }), Status::NoEnt);
    assert_eq!(d.err(1, Request::Detach { attachment: a }), Status::NoEnt);
    assert_eq!(d.err(1, Request::AcquireFini { ctx }), Status::NoEnt);
}

// ---- Review findings ----

/// Section 4 (handles `ENOENT` before the kind `EINVAL`) and section 8
/// (REVOKED: "the guest's handles now fail with `ENOENT`").
#[test]
fn pin_on_a_revoked_object_is_enoent_before_the_static_importer_einval() {
    let mut d = Dev::new();
    export(&mut d, "cam", 1, true, false, None);
    let h = handle(open_name(&mut d, 0, "cam").unwrap());
    let a = d.attach(0, h, false);
    let now = d.now;
    d.ex.host_revoke("cam", now).unwrap();
    assert_eq!(d.err(0, Dev::pin_req(a, 0, true)), Status::NoEnt);
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

/// Section 7.3 (`UNMAP`: "same locking rule as `MAP`"), section 4 (an
/// unknown handle is `ENOENT`) and section 7.4 (a request naming a context
/// that waits is `EBUSY`): an invalidated mapping skips the lock and the
/// sync, not the checks of the context it names.
#[test]
fn unmap_of_an_invalidated_mapping_still_checks_the_context_it_names() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let other = d.create(0, 1, false, false);
    let a = d.attach(0, o, true);
    let (ctx, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let m = d.map(0, a, Bidi, ctx);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), Some(Ok(())));
    let bad = Request::Unmap {
        mapping: m.mapping,
        ctx: 0xdead_beef,
    };
    assert_eq!(d.err(0, bad), Status::NoEnt);
    d.lock(0, c2, other);
    let t = d.park(0, Dev::lock_req(ctx, other));
    let busy = Request::Unmap {
        mapping: m.mapping,
        ctx,
    };
    assert_eq!(d.err(0, busy), Status::Busy);
    d.unlock(0, c2, other);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
    d.ok(
        0,
        Request::Unmap {
            mapping: m.mapping,
            ctx,
        },
    );
}

/// Section 10: the eviction timeout bounds the wait for the lock only; once
/// the mover holds it and waits for fences (section 8), that timer is
/// spent and must not stay due (the timer thread would spin on it).
#[test]
fn evict_lock_timeout_is_no_timer_once_the_mover_holds_the_lock() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    d.advance(Duration::from_secs(2));
    assert!(d.ex.take_host_completions().is_empty());
    let next = d.ex.next_deadline().expect("the fence timeout is pending");
    assert!(next > d.now, "a spent timer is still due: {next:?}");
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(d.ex.take_host_completions(), vec![(1, Ok(()))]);
}

/// Section 6 (a reset releases everything, waiting requests included) and
/// section 10 (eviction ends with a clear result): a move waiting on an
/// object that dies must end, not wait forever holding a dead lock.
#[test]
fn object_death_ends_a_waiting_eviction() {
    let mut d = Dev::new();
    let o = d.create(0, 1, true, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let u = uuid_of(&d, 0);
    assert_eq!(d.evict(u, 1), None);
    d.ok(0, Request::ResetSession);
    assert_eq!(d.object_count(), 0);
    assert_eq!(
        d.ex.take_host_completions(),
        vec![(1, Err(HostError::Canceled))]
    );
    assert_eq!(d.ex.next_deadline(), None);
}

/// Section 7.4: "A context has at most one waiting request; another request
/// that names it while one waits is `EBUSY`", also for an `UNPIN` that
/// unwinds a revoked object.
#[test]
fn unpin_on_a_revoked_object_is_ebusy_while_its_context_waits() {
    let mut d = Dev::new();
    export(&mut d, "cam", 1, true, false, None);
    let h = handle(open_name(&mut d, 0, "cam").unwrap());
    let other = d.create(0, 1, false, false);
    let a = d.attach(0, h, true);
    d.ok(0, Dev::pin_req(a, 0, true));
    let (ctx, _) = d.ctx(0);
    let (c2, _) = d.ctx(0);
    d.lock(0, c2, other);
    let t = d.park(0, Dev::lock_req(ctx, other));
    let now = d.now;
    d.ex.host_revoke("cam", now).unwrap();
    assert_eq!(d.err(0, Dev::pin_req(a, ctx, false)), Status::Busy);
    d.unlock(0, c2, other);
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)));
    d.ok(0, Dev::pin_req(a, ctx, false));
}
