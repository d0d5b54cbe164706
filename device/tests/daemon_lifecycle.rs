// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Lifetimes over the real socket (contract section 6): vring stop, device
//! reset, in-band reset, several isolated guests woken by each other, and
//! stopping the daemon with a front-end connected.

mod common;

use std::time::{Duration, Instant};

use common::daemon::*;
use dmabuf_guest_tests::vmm::channel::backend_req::{SHARED_OBJECT_LOOKUP, SHMEM_UNMAP};
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_device_dmabuf::exporter::ExportSpec;
use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

/// The used ring's index of `queue` as the device last wrote it.
fn used_idx(vm: &LoopbackVmm, queue: u16) -> u16 {
    vm.driver().device_used_idx(queue).expect("the used ring")
}

#[test]
fn vring_stop_returns_parked_chains_with_ecanceled_and_keeps_state() {
    let (d, mut vm) = two_queue_daemon();
    let (obj, a, b) = vm.lock_held();
    let parked = vm.send(2, &lock_request(b, obj));
    // The device took the chain (its avail_event moved past it).
    vm.wait_taken(2);
    assert_eq!(vm.info().version, 1);

    // GET_VRING_BASE: the parked chain is back before the answer.
    let base = vm.frontend().get_vring_base(2).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "one chain was taken from queue 2");
    assert_eq!(vm.try_wait(&parked), Some(Err(Status::Canceled)));

    // The guest's state stays: a still holds the lock.
    assert_eq!(vm.try_lock(b, obj), Err(Status::Busy));
    // The ring restarts and serves again.
    vm.restart_ring(2).expect("queue 2 restarts");
    let parked = vm.send(2, &lock_request(b, obj));
    assert_eq!(vm.unlock(a, obj), Ok(Reply::Empty));
    assert_eq!(vm.wait(parked), Ok(Reply::Empty));
    d.stop();
}

/// Makes the test front-end hold its answer to a `LOOKUP` of `uuid`: the
/// vring worker then sits inside an `OPEN` it took from the controlq, the
/// moment at which a stop or a reset meets a chain that left the avail ring
/// and is not back.
/// (The front-end does not know `uuid`: the held answer is a refusal.)
fn hold_lookups_of(vm: &LoopbackVmm, uuid: [u8; 16]) {
    assert!(!vm
        .shared_objects()
        .iter()
        .any(|(u, _)| *u.as_bytes() == uuid));
    vm.frontend_state().hold_lookups(true);
}

fn wait_for_lookup(vm: &LoopbackVmm, uuid: [u8; 16]) {
    wait_for_request(vm, "the LOOKUP", SHARED_OBJECT_LOOKUP, Some(uuid));
}

fn release_lookups(vm: &LoopbackVmm) {
    vm.frontend_state().hold_lookups(false);
}

#[test]
fn vring_stop_returns_a_chain_the_worker_holds_before_its_answer_and_nothing_after() {
    let _watchdog = Watchdog::arm("the vring stop test", Duration::from_secs(60));
    let (d, mut vm) = two_queue_daemon();
    let uuid = [7; 16];
    hold_lookups_of(&vm, uuid);
    let open = vm.send(0, &open_by_uuid(uuid));
    wait_for_lookup(&vm, uuid);
    // More work on the same ring while the worker is busy: not taken yet.
    let later = vm.send(0, &Request::GetInfo);

    let base = vm.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "one chain left the avail ring");
    // That chain is back before the answer: its request never ran.
    let done = vm
        .driver()
        .try_complete_raw(&open)
        .expect("the used ring")
        .expect("the chain is on the used ring when GET_VRING_BASE is answered");
    let (tag, response) = decode_response(Opcode::Open, &done.written).expect("a response");
    assert_eq!((tag, response), (open.tag(), Err(Status::Canceled)));

    // The worker comes back from the front-end, finds the chain gone and
    // leaves the stopped ring alone (no spinning on it): the other request
    // queue is served, and nothing more reaches the stopped ring.
    release_lookups(&vm);
    assert_eq!(vm.call(2, &Request::GetInfo).map(|_| ()), Ok(()));
    assert_eq!(used_idx(&vm, 0), 1, "nothing after the stop");
    assert!(vm.try_wait(&later).is_none());
    let opens = d
        .handle()
        .state()
        .lock()
        .stats()
        .requests
        .get("OPEN")
        .map_or(0, |by_status| by_status.values().sum::<u64>());
    assert_eq!(opens, 0, "the cancelled OPEN never reached the model");

    // The ring restarts and serves again.
    vm.restart_ring(0).expect("the controlq restarts");
    assert_eq!(vm.info().version, 1);
    d.stop();
}

#[test]
fn reset_device_writes_nothing_of_the_old_rings_into_the_new_ones() {
    let _watchdog = Watchdog::arm("the device reset test", Duration::from_secs(60));
    let (d, mut vm) = two_queue_daemon();
    let (obj, _a, b) = vm.lock_held();
    let uuid = [9; 16];
    hold_lookups_of(&vm, uuid);
    // One batch: an OPEN the worker asks the front-end about, then a LOCK
    // that would park behind `a`.
    let room = RESP_HDR_SIZE + INFO_SIZE;
    let driver = vm.driver();
    let batch = [
        driver.typed_item(driver.next_tag(), &open_by_uuid(uuid), room),
        driver.typed_item(driver.next_tag(), &lock_request(b, obj), room),
    ];
    let _tickets = driver.submit_batch(0, &batch).expect("one kick");
    wait_for_lookup(&vm, uuid);

    vm.frontend().reset_device().expect("RESET_DEVICE");
    assert_eq!(d.objects(), 0, "released before the answer");
    // The driver starts again, with new rings, before the worker is back.
    let features = vm.negotiated().features;
    vm.frontend().set_features(features).expect("SET_FEATURES");
    for q in 0..vm.negotiated().num_queues {
        vm.restart_ring(q).expect("the ring restarts");
    }
    release_lookups(&vm);

    // The first entry of the new controlq's used ring is its first chain.
    let info = vm.send(0, &Request::GetInfo);
    let info_tag = info.tag();
    let done = vm.driver().complete_raw(info).expect("the response");
    let (tag, response) = decode_response(Opcode::GetInfo, &done.written).expect("a response");
    assert_eq!(tag, info_tag);
    assert!(matches!(response, Ok(Reply::Info(_))), "{response:?}");
    assert_eq!(used_idx(&vm, 0), 1, "nothing of the old rings");
    let ctx = vm.acquire();
    assert_eq!(used_idx(&vm, 0), 2);
    assert_ne!(ctx, 0);
    d.stop();
}

#[test]
fn reset_device_releases_everything_and_the_device_serves_again() {
    let d = TestDaemon::start(|_| {});
    let mut vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    let ctx = vm.acquire();
    assert_eq!(vm.call(0, &lock_request(ctx, obj)), Ok(Reply::Empty));
    assert_eq!(
        vm.map_shm(obj, false),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: PAGE
        })
    );
    assert_eq!(d.objects(), 1);

    vm.frontend().reset_device().expect("RESET_DEVICE");
    assert_eq!(d.objects(), 0, "released before the answer");
    poll_until("the window to be emptied", || {
        vm.frontend_state()
            .received()
            .iter()
            .any(|r| r.request == SHMEM_UNMAP && matches!(r.shm_range, Some((0, _))))
            .then_some(())
    });

    // The driver starts again: features, then the rings.
    let features = vm.negotiated().features;
    vm.frontend().set_features(features).expect("SET_FEATURES");
    for q in 0..usize::from(vm.negotiated().num_queues) {
        vm.frontend()
            .set_vring_enable(q, true)
            .expect("SET_VRING_ENABLE");
    }
    assert_eq!(vm.release(obj), Err(Status::NoEnt));
    assert_eq!(vm.create(PAGE).size, PAGE);
    d.stop();
}

#[test]
fn reset_session_cancels_waiting_requests_and_releases_everything() {
    let (d, vm) = two_queue_daemon();
    let (obj, _, b) = vm.lock_held();
    let parked = vm.send(2, &lock_request(b, obj));
    // Parked before the reset (not still in the ring when it runs).
    vm.wait_taken(2);
    assert_eq!(vm.call(0, &Request::ResetSession), Ok(Reply::Empty));
    assert_eq!(vm.wait(parked), Err(Status::Canceled));
    assert_eq!(d.objects(), 0);
    d.stop();
}

#[test]
fn guests_are_isolated_and_wake_each_other() {
    let d = TestDaemon::start(|c| {
        let second = c.socket_paths[0].with_extension("1");
        c.socket_paths.push(second);
    });
    // A host export both guests may open.
    let uuid = {
        let state = d.handle().state();
        let mut ex = state.lock();
        let backing = MemfdProvider::new(1 << 20)
            .allocate(PAGE)
            .expect("memfd buffer");
        let spec = ExportSpec {
            name: "shared".into(),
            dynamic: false,
            read_only: false,
            guests: None,
        };
        let uuid = ex.host_export(spec, backing).expect("export");
        state.changed(&ex);
        uuid
    };
    let g0 = d.vm(0, VmmOptions::default());
    let g1 = d.vm(1, VmmOptions::default());
    let open = Request::Open {
        uuid: None,
        name: b"shared".to_vec(),
    };
    let h0 = match g0.call(0, &open) {
        Ok(Reply::Object(o)) => o,
        other => panic!("OPEN: {other:?}"),
    };
    let h1 = match g1.call(0, &open) {
        Ok(Reply::Object(o)) => o,
        other => panic!("OPEN: {other:?}"),
    };
    assert_eq!(h0.uuid, *uuid.as_bytes());
    assert_eq!(h1.uuid, h0.uuid);
    // A guest's own objects are invisible to the other.
    let private = g0.create(PAGE);
    assert_eq!(
        g1.call(0, &open_by_uuid(private.uuid)),
        Err(Status::NoEnt),
        "not known here for guest 1; its front-end does not know it either"
    );

    // Guest 1 waits for the lock guest 0 holds; guest 0's UNLOCK wakes
    // guest 1's worker, which returns the chain.
    let (c0, c1) = (g0.acquire(), g1.acquire());
    assert_eq!(g0.call(0, &lock_request(c0, h0.object)), Ok(Reply::Empty));
    let parked = g1.send(0, &lock_request(c1, h1.object));
    g1.wait_taken(0);
    assert!(g1.try_wait(&parked).is_none());
    assert_eq!(g0.unlock(c0, h0.object), Ok(Reply::Empty));
    assert_eq!(g1.wait(parked), Ok(Reply::Empty));

    // A host revoke reaches both guests' eventqs.
    g0.post_event_buffer(32);
    g1.post_event_buffer(32);
    {
        let state = d.handle().state();
        let mut ex = state.lock();
        ex.host_revoke("shared", Instant::now()).expect("revoke");
        state.changed(&ex);
    }
    let ev0 = g0.wait_event();
    let ev1 = g1.wait_event();
    assert_eq!((ev0.kind, ev0.object), (EventType::Revoked, h0.object));
    assert_eq!((ev1.kind, ev1.object), (EventType::Revoked, h1.object));
    d.stop();
}

#[test]
fn stop_hangs_up_connected_front_ends_and_removes_the_sockets() {
    let d = TestDaemon::start(|_| {});
    let path = d.socket(0);
    let mut vm = d.vm(0, VmmOptions::default());
    vm.create(PAGE);
    assert!(path.exists());
    let handle_state = std::sync::Arc::clone(d.handle().state());
    d.stop();
    assert!(!path.exists(), "the socket is removed");
    assert!(
        handle_state.lock().list().is_empty(),
        "the guest was released"
    );
    // The front-end sees the hang-up.
    assert!(vm.frontend().get_features().is_err());
}
