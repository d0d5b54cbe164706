// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! ATTACH, DETACH, MAP, UNMAP, PIN, UNPIN and cached mappings (contract section
//! 7.3; `src/exporter/attach.rs`).

use super::helpers::*;

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
