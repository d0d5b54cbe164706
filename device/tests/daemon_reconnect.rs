// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A front-end that disconnects in the middle of parked requests, and the
//! next one on the same socket (contract section 6). The only test in this
//! binary, so the process's fd count is the daemon's and this test's.

mod common;

use common::daemon::*;
use dmabuf_guest_tests::vmm::channel::backend_req;
use dmabuf_guest_tests::vmm::VmmOptions;
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

/// One connection that leaves as much behind as it can: objects, a window
/// placement, a published shared object (whose fd also went to the
/// front-end through the relay), an attachment with a mapping, a held lock,
/// a parked LOCK, a parked WAIT on a fence, and a worker waiting for the
/// front-end's answer to a LOOKUP.
fn busy_connection(d: &TestDaemon) -> u64 {
    let mut vm = d.vm(0, VmmOptions::default());
    assert_eq!(vm.negotiated().num_queues, 3, "two request queues");
    let obj = vm.create(2 * PAGE).object;
    let other = vm.create(PAGE).object;
    assert!(matches!(vm.map_shm(obj, true), Ok(Reply::Shm { .. })));
    let uuid = vm.exported_uuid(other);
    // The object's fd crosses the relay from the daemon to the front-end.
    let shared = vm
        .get_shared_object(uuid::Uuid::from_bytes(uuid))
        .expect("GET_SHARED_OBJECT");
    drop(shared);
    let att = vm.attach(other, false);
    vm.map(att, Direction::ToDevice, 4);
    let (a, b) = (vm.acquire(), vm.acquire());
    assert_eq!(vm.call(0, &lock_request(a, obj)), Ok(Reply::Empty));
    let fence = match vm.call(
        0,
        &Request::FenceAttach {
            ctx: a,
            object: obj,
            usage: FenceUsage::Write,
            host: false,
        },
    ) {
        Ok(Reply::Fence(f)) => f,
        r => panic!("FENCE_ATTACH: {r:?}"),
    };
    assert_ne!(fence, 0);
    // Parked: a LOCK on controlq2 and a WAIT on the controlq.
    let lock = vm.send(2, &lock_request(b, obj));
    let wait = vm.send(
        0,
        &Request::Wait {
            object: obj,
            usage: FenceUsage::Write,
            timeout_ns: 60_000_000_000,
        },
    );
    vm.wait_taken(2);
    vm.wait_taken(0);
    assert!(vm.try_wait(&lock).is_none());
    assert!(vm.try_wait(&wait).is_none());
    // The worker asks the front-end about a UUID, which does not answer.
    vm.frontend_state().hold_lookups(true);
    let looking = vm.send(2, &open_by_uuid([0x42; 16]));
    wait_for_request(&vm, "the LOOKUP", backend_req::SHARED_OBJECT_LOOKUP, None);
    assert!(vm.try_wait(&looking).is_none());
    assert_eq!(d.objects(), 2);
    obj
    // The front-end goes away here, with all of it outstanding.
}

#[test]
fn disconnect_with_parked_requests_then_reconnect_finds_nothing_and_leaks_no_fds() {
    let d = TestDaemon::start(|c| {
        c.request_queues = 2;
        c.allow_memfd_shared_objects = true;
    });
    let baseline = open_fds();

    for round in 0..3 {
        let old = busy_connection(&d);
        poll_until("the guest to be released", || {
            (d.objects() == 0).then_some(())
        });

        // The next front-end on the same socket finds nothing left.
        let vm = d.vm(0, VmmOptions::default());
        assert_eq!(vm.release(old), Err(Status::NoEnt), "round {round}");
        let info = vm.info();
        assert_eq!(info.version, 1);
        let fresh = vm.create(PAGE).object;
        assert!(fresh > old, "handles are never reused");
        drop(vm);
        poll_until("the guest to be released", || {
            (d.objects() == 0).then_some(())
        });

        // Every fd the connections used is closed again.
        poll_until(&format!("fds back to {baseline} (round {round})"), || {
            (open_fds() == baseline).then_some(())
        });
    }
    d.stop();
}
