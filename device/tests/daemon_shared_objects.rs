// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Virtio shared objects over the real socket: `EXPORT_UUID` and
//! `SHARED_OBJECT_ADD`/`_REMOVE`, `GET_SHARED_OBJECT`, and `OPEN` BY_UUID
//! through `SHARED_OBJECT_LOOKUP` (contract sections 1 and 7.2;
//! `docs/shared-objects.md`).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use common::daemon::*;
use dmabuf_guest_tests::driver::{BatchItem, RawChain};
use dmabuf_guest_tests::vmm::channel::backend_req::{
    SHARED_OBJECT_ADD, SHARED_OBJECT_LOOKUP, SHARED_OBJECT_REMOVE,
};
use dmabuf_guest_tests::vmm::VmmOptions;
use uuid::Uuid;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

/// A memfd of `pages` pages filled with `byte`, as another device's buffer.
fn foreign_buffer(pages: u64, byte: u8) -> OwnedFd {
    let mut f = memfd("other-device", pages * PAGE);
    f.write_all(&vec![byte; (pages * PAGE) as usize])
        .expect("fill");
    OwnedFd::from(f)
}

#[test]
fn export_uuid_adds_get_shared_object_answers_and_death_removes() {
    let d = TestDaemon::start(|c| c.allow_memfd_shared_objects = true);
    let mut vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    assert_eq!(vm.transfer_to(obj, 0, b"shared bytes"), Ok(Reply::Empty));
    let uuid = vm.exported_uuid(obj);
    // ADD was acked before the guest got its answer.
    assert!(vm
        .backend_requests()
        .iter()
        .any(|m| m.request == SHARED_OBJECT_ADD && m.uuid == Some(Uuid::from_bytes(uuid))));
    // Exporting again does not add again.
    assert_eq!(vm.export_uuid(obj), Ok(Reply::Uuid(uuid)));

    // The front-end asks for the object's fd (GET_SHARED_OBJECT, 41).
    let file = vm
        .get_shared_object(Uuid::from_bytes(uuid))
        .expect("the object's fd");
    assert_eq!(read_fd(&file, 0, 12), b"shared bytes");
    drop(file);
    // An unknown UUID: no fd, and the connection goes on.
    assert!(vm.get_shared_object(Uuid::from_bytes([9; 16])).is_err());
    assert_eq!(vm.info().version, 1);

    // The object dies with its last handle: REMOVE.
    assert_eq!(vm.release(obj), Ok(Reply::Empty));
    wait_for_answer(&vm, "SHARED_OBJECT_REMOVE", SHARED_OBJECT_REMOVE, uuid);
    assert!(vm.get_shared_object(Uuid::from_bytes(uuid)).is_err());
    d.stop();
}

#[test]
fn export_uuid_of_a_memfd_object_needs_the_test_flag() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    assert_eq!(vm.export_uuid(obj), Err(Status::NotSupported));
    d.stop();
}

#[test]
fn open_by_uuid_looks_the_object_up_on_the_front_end() {
    let d = TestDaemon::start(|c| c.allow_memfd_shared_objects = true);
    let vm = d.vm(0, VmmOptions::default());
    let (found, refused, no_fd) = ([1; 16], [2; 16], [3; 16]);
    // Found: another device's buffer. Refused: the front-end does not
    // know it. No fd: success without one.
    vm.publish_shared_object(Uuid::from_bytes(found), foreign_buffer(2, 0x5a));
    vm.frontend_state()
        .answer_lookup_without_fd(Uuid::from_bytes(no_fd));

    let req = open_by_uuid(found);
    let o = match vm.call(0, &req) {
        Ok(Reply::Object(o)) => o,
        other => panic!("OPEN BY_UUID: {other:?}"),
    };
    assert_eq!(o.uuid, found);
    assert_eq!(o.size, 2 * PAGE);
    assert_eq!(vm.transfer_from(o.object, PAGE, 4), [0x5a; 4]);
    // Opening it again is resolved here: same handle, no second LOOKUP.
    assert!(matches!(vm.call(0, &req), Ok(Reply::Object(again)) if again.object == o.object));

    // The front-end does not know it: ENOENT.
    let req = open_by_uuid(refused);
    assert_eq!(vm.call(0, &req), Err(Status::NoEnt));
    // Success without an fd (what QEMU's front-end does): EIO.
    let req = open_by_uuid(no_fd);
    assert_eq!(vm.call(0, &req), Err(Status::Io));

    // UUIDs this back-end published are never looked up.
    let mine = vm.create(PAGE).object;
    let uuid = vm.exported_uuid(mine);
    let req = open_by_uuid(uuid);
    assert!(matches!(vm.call(0, &req), Ok(Reply::Object(m)) if m.object == mine));
    let lookups: Vec<[u8; 16]> = vm
        .frontend_state()
        .received()
        .iter()
        .filter(|r| r.request == SHARED_OBJECT_LOOKUP)
        .filter_map(|r| r.uuid.map(Uuid::into_bytes))
        .collect();
    assert_eq!(lookups, [found, refused, no_fd]);
    d.stop();
}

#[test]
fn get_shared_object_is_answered_while_a_lookup_waits() {
    let d = TestDaemon::start(|c| c.allow_memfd_shared_objects = true);
    let mut vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    let published = vm.exported_uuid(obj);
    let wanted = [7; 16];
    vm.frontend_state().hold_lookups(true);
    vm.publish_shared_object(Uuid::from_bytes(wanted), foreign_buffer(1, 1));
    let req = open_by_uuid(wanted);
    let pending = vm.send(0, &req);
    wait_for_request(&vm, "the LOOKUP", SHARED_OBJECT_LOOKUP, Some(wanted));
    // The back-end waits for the front-end's LOOKUP answer; the front-end
    // asks it for an object meanwhile, and gets it.
    let file = vm
        .get_shared_object(Uuid::from_bytes(published))
        .expect("answered while the LOOKUP waits");
    drop(file);
    assert!(vm.try_wait(&pending).is_none());
    vm.frontend_state().hold_lookups(false);
    assert!(matches!(vm.wait(pending), Ok(Reply::Object(o)) if o.uuid == wanted));
    d.stop();
}

/// Why the daemon does not use `vhost::Backend::shared_object_lookup`: it
/// sends an fd with the request and cannot take one from the reply, so a
/// front-end that answers as the vhost-user specification says (result 0
/// and the object's fd) gets an error, and the fd is lost.
#[test]
fn the_vhost_crate_backend_cannot_receive_a_lookup_fd() {
    let (ours, mut theirs) = UnixStream::pair().expect("pair");
    let backend = Backend::from_stream(ours);
    backend.set_reply_ack_flag(true);
    backend.set_shared_object_flag(true);
    let front_end = std::thread::spawn(move || {
        let mut request = [0u8; 12 + 16];
        theirs.read_exact(&mut request).expect("LOOKUP request");
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().expect("4")), 8);
        // The specification's reply: header, u64 0, and the fd.
        let fd = foreign_buffer(1, 0);
        let mut reply = Vec::new();
        reply.extend_from_slice(&8u32.to_ne_bytes());
        reply.extend_from_slice(&(1u32 | 4).to_ne_bytes());
        reply.extend_from_slice(&8u32.to_ne_bytes());
        reply.extend_from_slice(&0u64.to_ne_bytes());
        let fds = [std::os::fd::AsFd::as_fd(&fd)];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &theirs,
            &[std::io::IoSlice::new(&reply)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .expect("reply");
    });
    // The crate insists on sending an fd of ours along with the request.
    let placeholder = memfd("placeholder", 0);
    let result = backend.shared_object_lookup(&shared_msg([4; 16]), &placeholder.as_raw_fd());
    front_end.join().expect("front-end thread");
    assert!(
        result.is_err(),
        "a spec reply with an fd is rejected: {result:?}"
    );
}

/// With `REPLY_ACK` every channel message but `LOOKUP` (which always has a
/// reply) asks for an ack, and a refusal reaches the guest as `EIO` with
/// nothing left published; without it nothing is awaited.
#[test]
fn channel_messages_ask_for_an_ack_exactly_when_reply_ack_is_live() {
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    const NEED_REPLY: u32 = 0x8;
    let d = TestDaemon::start(|c| c.allow_memfd_shared_objects = true);

    let vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    assert!(matches!(vm.map_shm(obj, false), Ok(Reply::Shm { .. })));
    assert!(matches!(vm.export_uuid(obj), Ok(Reply::Uuid(_))));
    let other = vm.create(PAGE).object;
    vm.frontend_state().refuse(SHARED_OBJECT_ADD);
    assert_eq!(vm.export_uuid(other), Err(Status::Io));
    let uuid = match vm.call(0, &Request::ExportUuid { object: other }) {
        Err(Status::Io) => None,
        Ok(Reply::Uuid(u)) => Some(u),
        r => panic!("EXPORT_UUID: {r:?}"),
    };
    assert_eq!(uuid, None, "still refused: nothing was published");
    let open = open_by_uuid([5; 16]);
    assert_eq!(vm.call(0, &open), Err(Status::NoEnt));
    let headers = channel_headers(&vm);
    assert_eq!(
        headers.iter().map(|h| h.0).collect::<Vec<_>>(),
        [9, 6, 6, 6, 8]
    );
    for (request, flags) in headers {
        let want = if request == 8 { 0 } else { NEED_REPLY };
        assert_eq!(flags & NEED_REPLY, want, "request {request}");
    }
    drop(vm);

    let vm = d.vm(
        0,
        VmmOptions::default().without_protocol(VhostUserProtocolFeatures::REPLY_ACK),
    );
    let obj = vm.create(PAGE).object;
    assert!(matches!(vm.export_uuid(obj), Ok(Reply::Uuid(_))));
    // Nothing is awaited without REPLY_ACK: the message may still be on its
    // way to the front-end's channel thread when the guest has its answer.
    let headers = poll_until("SHARED_OBJECT_ADD at the front-end", || {
        let h = channel_headers(&vm);
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(headers, [(6, 0x1)], "no NEED_REPLY without REPLY_ACK");
    d.stop();
}

/// A worker takes 32 chains at a time and writes the used entries of one
/// batch when it takes the next. The chains answered before a request
/// that waits for the front-end are on the used ring, and signalled,
/// during the wait.
#[test]
fn answers_before_a_lookup_are_signalled_while_it_waits() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, VmmOptions::default());
    assert_eq!(vm.info().version, 1);
    let wanted = [9; 16];
    vm.frontend_state().hold_lookups(true);
    vm.publish_shared_object(Uuid::from_bytes(wanted), foreign_buffer(1, 1));
    let call = vm
        .notifier()
        .call_fd(0)
        .expect("the controlq's call eventfd");
    let used = vm.driver().device_used_idx(0).expect("the used ring");
    // The driver wants a call as soon as one chain comes back.
    vm.driver().set_used_event(0, used).expect("used_event");
    let _ = call.read();
    let mut items: Vec<BatchItem> = (0..32)
        .map(|tag| {
            let request = encode_request(tag, &Request::GetInfo);
            BatchItem::raw(RawChain::new().readable(request).writable(64))
        })
        .collect();
    let open = encode_request(99, &open_by_uuid(wanted));
    items.push(BatchItem::raw(RawChain::new().readable(open).writable(256)));
    let tickets = vm.driver().submit_batch(0, &items).expect("the batch");
    wait_for_request(&vm, "the LOOKUP", SHARED_OBJECT_LOOKUP, Some(wanted));
    poll_until("the call for the first 32 answers", || call.read().ok());
    assert_eq!(
        vm.driver().device_used_idx(0).expect("the used ring"),
        used.wrapping_add(32),
        "the 32 answers are on the used ring, the OPEN is not"
    );
    vm.frontend_state().hold_lookups(false);
    let completions: Vec<_> = tickets
        .into_iter()
        .map(|t| vm.driver().complete_raw(t).expect("the chain comes back"))
        .collect();
    assert_eq!(completions.len(), 33);
    d.stop();
}

/// A request that completes a parked one (an `UNLOCK` letting another
/// context have the lock) is followed, in the same batch, by one that
/// waits for the front-end: the parked request is answered before the
/// wait, not when the worker is done with the ring.
#[test]
fn requests_completed_by_a_batch_are_answered_before_it_waits_for_the_front_end() {
    let d = TestDaemon::start(|c| c.request_queues = 2);
    let vm = d.vm(0, VmmOptions::default());
    let (obj, a, b) = vm.lock_held();
    let parked = vm.send(2, &lock_request(b, obj));
    poll_until("the LOCK to park", || {
        vm.vmm().driver().device_took_all(2).ok().filter(|&t| t)
    });
    assert!(vm.try_wait(&parked).is_none(), "parked behind a");
    let wanted = [11; 16];
    vm.frontend_state().hold_lookups(true);
    vm.publish_shared_object(Uuid::from_bytes(wanted), foreign_buffer(1, 1));
    let unlock = encode_request(
        1,
        &Request::Unlock {
            ctx: a,
            object: obj,
        },
    );
    let open = encode_request(2, &open_by_uuid(wanted));
    let items = [
        BatchItem::raw(RawChain::new().readable(unlock).writable(64)),
        BatchItem::raw(RawChain::new().readable(open).writable(256)),
    ];
    let tickets = vm.driver().submit_batch(0, &items).expect("the batch");
    wait_for_request(&vm, "the LOOKUP", SHARED_OBJECT_LOOKUP, Some(wanted));
    let locked = poll_until("b's LOCK answered", || vm.try_wait(&parked));
    assert_eq!(locked, Ok(Reply::Empty));
    assert!(
        !vm.driver().poll(&tickets[1]).expect("the OPEN's ticket"),
        "the OPEN still waits for its LOOKUP"
    );
    vm.frontend_state().hold_lookups(false);
    for t in tickets {
        vm.driver().complete_raw(t).expect("the chain comes back");
    }
    assert_eq!(vm.unlock(b, obj), Ok(Reply::Empty));
    d.stop();
}
