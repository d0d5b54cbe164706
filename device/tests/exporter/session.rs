// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! GET_INFO, RESET_SESSION and what one guest may name of another (contract
//! sections 6 and 7.1; `src/exporter/session.rs`).

use super::helpers::*;

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
