//! Lifetimes over the real socket (contract section 6): vring stop, device
//! reset, in-band reset, several isolated guests woken by each other, and
//! stopping the daemon with a front-end connected.

mod vhost_harness;

use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_device_dmabuf::exporter::ExportSpec;
use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
use vhost_harness::*;
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

#[test]
fn vring_stop_returns_parked_chains_with_ecanceled_and_keeps_state() {
    let (d, mut vm) = two_queue_daemon();
    let (obj, a, b) = vm.lock_held();
    let parked = vm.send(2, &Vm::lock_request(b, obj));
    // The device took the chain (its avail_event moved past it).
    vm.queues[2].wait_taken(&vm.ram);
    assert_eq!(vm.info().version, 1);

    // GET_VRING_BASE: the parked chain is back before the answer.
    let base = vm.fe.get_vring_base(2).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "one chain was taken from queue 2");
    assert_eq!(vm.try_wait(parked), Some(Err(Status::Canceled)));

    // The guest's state stays: a still holds the lock.
    assert_eq!(vm.try_lock(b, obj), Err(Status::Busy));
    // The ring restarts and serves again.
    vm.restart_ring(2);
    let parked = vm.send(2, &Vm::lock_request(b, obj));
    assert_eq!(vm.unlock(a, obj), Ok(Reply::Empty));
    assert_eq!(vm.wait(parked), Ok(Reply::Empty));
    d.stop();
}

/// Makes the test front-end hold its answer to a `LOOKUP` of `uuid`: the
/// vring worker then sits inside an `OPEN` it took from the controlq, the
/// moment at which a stop or a reset meets a chain that left the avail ring
/// and is not back.
fn hold_lookups_of(vm: &Vm, uuid: [u8; 16]) {
    vm.peer().with(|st| {
        st.hold_lookups = true;
        st.lookups.insert(uuid, LookupAnswer::Refuse);
    });
}

fn wait_for_lookup(vm: &Vm, uuid: [u8; 16]) {
    vm.peer().wait_for_msg(
        "the LOOKUP",
        |m| matches!(m, ChannelMsg::Lookup(u) if *u == uuid),
    );
}

fn release_lookups(vm: &Vm) {
    vm.peer().with(|st| st.hold_lookups = false);
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

    let base = vm.fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "one chain left the avail ring");
    // That chain is back before the answer: its request never ran.
    let len = vm.queues[0]
        .try_used(&vm.ram, open.head)
        .expect("the chain is on the used ring when GET_VRING_BASE is answered");
    let (tag, response) = decode_response(Opcode::Open, &vm.ram.read(open.reply_gpa, len as usize))
        .expect("a response");
    assert_eq!((tag, response), (open.tag, Err(Status::Canceled)));

    // The worker comes back from the front-end, finds the chain gone and
    // leaves the stopped ring alone (no spinning on it): the other request
    // queue is served, and nothing more reaches the stopped ring.
    release_lookups(&vm);
    assert_eq!(vm.call(2, &Request::GetInfo).map(|_| ()), Ok(()));
    assert_eq!(vm.queues[0].used_idx(&vm.ram), 1, "nothing after the stop");
    assert!(vm.try_wait(later).is_none());
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
    vm.restart_ring(0);
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
    let room = (RESP_HDR_SIZE + INFO_SIZE) as u32;
    vm.post(0, &open_by_uuid(uuid), room);
    vm.post(0, &Vm::lock_request(b, obj), room);
    vm.queues[0].notify();
    wait_for_lookup(&vm, uuid);

    vm.fe.reset_device().expect("RESET_DEVICE");
    assert_eq!(d.objects(), 0, "released before the answer");
    // The driver starts again, with new rings, before the worker is back.
    let features = vm.features();
    vm.fe.set_features(features).expect("SET_FEATURES");
    for q in 0..vm.queues.len() {
        vm.restart_ring(q);
    }
    release_lookups(&vm);

    // The first entry of the new controlq's used ring is its first chain.
    let info = vm.send(0, &Request::GetInfo);
    let (tag, response) = vm.wait_tagged(info);
    assert_eq!(tag, info.tag);
    assert!(matches!(response, Ok(Reply::Info(_))), "{response:?}");
    assert_eq!(
        vm.queues[0].used_idx(&vm.ram),
        1,
        "nothing of the old rings"
    );
    let ctx = vm.acquire();
    assert_eq!(vm.queues[0].used_idx(&vm.ram), 2);
    assert_ne!(ctx, 0);
    d.stop();
}

#[test]
fn reset_device_releases_everything_and_the_device_serves_again() {
    let d = TestDaemon::start(|_| {});
    let mut vm = Vm::connect(&d.socket(0));
    let obj = vm.create(PAGE).object;
    let ctx = vm.acquire();
    assert_eq!(vm.call(0, &Vm::lock_request(ctx, obj)), Ok(Reply::Empty));
    assert_eq!(
        vm.map_shm(obj, false),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: PAGE
        })
    );
    assert_eq!(d.objects(), 1);

    vm.fe.reset_device().expect("RESET_DEVICE");
    assert_eq!(d.objects(), 0, "released before the answer");
    vm.peer().wait_for_msg("the window to be emptied", |m| {
        matches!(m, ChannelMsg::ShmemUnmap { shm_offset: 0, .. })
    });

    // The driver starts again: features, then the rings.
    let features = vm.features();
    vm.fe.set_features(features).expect("SET_FEATURES");
    for q in 0..vm.queues.len() {
        vm.fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }
    assert_eq!(vm.release(obj), Err(Status::NoEnt));
    assert_eq!(vm.create(PAGE).size, PAGE);
    d.stop();
}

#[test]
fn reset_session_cancels_waiting_requests_and_releases_everything() {
    let (d, mut vm) = two_queue_daemon();
    let (obj, _, b) = vm.lock_held();
    let parked = vm.send(2, &Vm::lock_request(b, obj));
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
    let mut g0 = Vm::connect(&d.socket(0));
    let mut g1 = Vm::connect(&d.socket(1));
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
    assert_eq!(
        g0.call(0, &Vm::lock_request(c0, h0.object)),
        Ok(Reply::Empty)
    );
    let parked = g1.send(0, &Vm::lock_request(c1, h1.object));
    g1.queues[0].wait_taken(&g1.ram);
    assert!(g1.try_wait(parked).is_none());
    assert_eq!(g0.unlock(c0, h0.object), Ok(Reply::Empty));
    assert_eq!(g1.wait(parked), Ok(Reply::Empty));

    // A host revoke reaches both guests' eventqs.
    let (e0, gpa0) = g0.post_event_buffer(32);
    let (e1, gpa1) = g1.post_event_buffer(32);
    {
        let state = d.handle().state();
        let mut ex = state.lock();
        ex.host_revoke("shared", Instant::now()).expect("revoke");
        state.changed(&ex);
    }
    let ev0 = g0.wait_event(e0, gpa0);
    let ev1 = g1.wait_event(e1, gpa1);
    assert_eq!((ev0.kind, ev0.object), (EventType::Revoked, h0.object));
    assert_eq!((ev1.kind, ev1.object), (EventType::Revoked, h1.object));
    d.stop();
}

#[test]
fn stop_hangs_up_connected_front_ends_and_removes_the_sockets() {
    let d = TestDaemon::start(|_| {});
    let path = d.socket(0);
    let mut vm = Vm::connect(&path);
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
    assert!(vm.fe.get_features().is_err());
}
