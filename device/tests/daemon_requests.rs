// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Requests through real descriptor chains on the daemon's socket: the
//! object life cycle, request framing, bad chains, parked requests, the
//! copy path and guest pages (contract sections 2, 4, 7 and 10).

mod common;

use common::daemon::*;
use dmabuf_guest_tests::driver::{BatchItem, Desc, RawChain, RawCompletion};
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use vhost::VhostBackend;
use virtio_dmabuf_protocol::*;
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

/// Guest RAM of one region of `size` bytes at 0.
fn ram(size: u64) -> VmmOptions {
    VmmOptions {
        ram: vec![(0, size)],
        ..VmmOptions::default()
    }
}

/// Makes every chain of `batch` available on `queue` at once; returns
/// what came back for each, in order.
fn run_batch(vm: &LoopbackVmm, queue: u16, batch: Vec<RawChain>) -> Vec<RawCompletion> {
    let items: Vec<BatchItem> = batch.into_iter().map(BatchItem::raw).collect();
    let tickets = vm.driver().submit_batch(queue, &items).expect("the batch");
    tickets
        .into_iter()
        .map(|t| vm.driver().complete_raw(t).expect("the chain comes back"))
        .collect()
}

/// (status, tag) of the response header a chain's writable part holds.
fn response_header(c: &RawCompletion) -> (u32, u64) {
    let r = &c.written;
    assert!(r.len() >= 16, "no response header: {c:?}");
    (
        u32::from_le_bytes(r[0..4].try_into().expect("4")),
        u64::from_le_bytes(r[8..16].try_into().expect("8")),
    )
}

/// The controlq's used index as the device last wrote it.
fn used_idx(vm: &LoopbackVmm) -> u16 {
    vm.driver().device_used_idx(0).expect("the used ring")
}

/// A descriptor the driver does not back: an address outside guest RAM.
fn outside(addr: u64, len: u32, write: bool) -> Desc {
    Desc { addr, len, write }
}

#[test]
fn create_attach_map_unmap_detach_release_through_chains() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, ram(32 << 20));
    let obj = vm.create(2 * PAGE);
    assert_ne!(obj.object, 0);
    assert_eq!(obj.size, 2 * PAGE);
    assert_eq!(obj.obj_flags & obj_flags::WRITABLE, obj_flags::WRITABLE);
    assert_eq!(obj.obj_flags & obj_flags::REAL_DMABUF, 0);

    let att = vm.attach(obj.object, false);
    let map = vm.map(att, Direction::ToDevice, 4);
    assert_eq!(
        map.space,
        AddressSpace::Object,
        "not in the window: offsets"
    );
    assert_eq!(
        map.entries.iter().map(|e| e.len).sum::<u64>(),
        2 * PAGE,
        "{map:?}"
    );
    // Still mapped: DETACH is EBUSY, RELEASE too.
    assert_eq!(
        vm.call(0, &Request::Detach { attachment: att }),
        Err(Status::Busy)
    );
    assert_eq!(vm.release(obj.object), Err(Status::Busy));
    assert_eq!(vm.unmap(map.mapping), Ok(Reply::Empty));
    assert_eq!(
        vm.call(0, &Request::Detach { attachment: att }),
        Ok(Reply::Empty)
    );
    assert_eq!(vm.release(obj.object), Ok(Reply::Empty));
    assert_eq!(vm.release(obj.object), Err(Status::NoEnt));
    assert_eq!(d.objects(), 0);
    d.stop();
}

#[test]
fn a_header_may_span_descriptors_and_indirect_tables_work() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, ram(32 << 20));
    let bytes = encode_request(0x77, &Request::GetInfo);
    // The 16-byte header in 3-byte pieces; the reply in 5-byte pieces.
    let cuts: Vec<usize> = (3..bytes.len()).step_by(3).collect();
    let reply_len = RESP_HDR_SIZE + INFO_SIZE;
    let parts = vec![5u32; reply_len.div_ceil(5)];
    let chain = RawChain::split(&bytes, &cuts, &parts).indirect(false);
    assert_eq!(chain.descs.len(), bytes.len().div_ceil(3) + parts.len());
    let t = vm.driver().submit_raw(0, chain).expect("the chain");
    let done = vm.driver().complete_raw(t).expect("the chain comes back");
    let used = done.used_len as usize;
    assert_eq!(used, reply_len);
    let reply = &done.written;
    let (tag, response) = decode_response(Opcode::GetInfo, &reply[..used]).expect("decodes");
    assert_eq!(tag, 0x77);
    assert!(matches!(response, Ok(Reply::Info(i)) if i.version == 1));

    // The same request through one indirect descriptor.
    let chain = RawChain::new()
        .readable(encode_request(0x78, &Request::GetInfo))
        .writable(reply_len as u32)
        .indirect(true);
    let t = vm.driver().submit_raw(0, chain).expect("the chain");
    let done = vm.driver().complete_raw(t).expect("the chain comes back");
    assert_eq!(done.used_len as usize, reply_len);
    let (tag, _) = decode_response(Opcode::GetInfo, &done.written).expect("decodes");
    assert_eq!(tag, 0x78);
    d.stop();
}

#[test]
fn every_bad_chain_comes_back_and_the_batch_goes_on() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, ram(32 << 20));
    let ram_end = 32 << 20;
    let info = encode_request(5, &Request::GetInfo);

    // 1. A writable part too short for the response header: used.len 0.
    let b1 = RawChain::new().readable(info.clone()).writable(8);
    // 2. An unknown opcode: ENOSYS, tag echoed.
    let mut unknown = info.clone();
    unknown[0..4].copy_from_slice(&0xbeefu32.to_le_bytes());
    unknown[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
    let b2 = RawChain::new().readable(unknown).writable(16);
    // 3. A readable part outside guest memory: EFAULT.
    let b3 = RawChain::new()
        .at(outside(ram_end + PAGE, 16, false))
        .writable(16);
    // 4. A writable part outside guest memory: used.len 0.
    let b4 = RawChain::new()
        .readable(info.clone())
        .at(outside(ram_end + PAGE, 96, true));
    // 5. A readable part too short for its opcode: EINVAL.
    let short = encode_request(6, &Request::Release { object: 1 });
    let b5 = RawChain::new().readable(&short[..20]).writable(16);
    // 6. A good request after all of them.
    let b6 = RawChain::new().readable(info.clone()).writable(96);
    let before = used_idx(&vm);
    let done = run_batch(&vm, 0, vec![b1, b2, b3, b4, b5, b6]);
    let used: Vec<u32> = done.iter().map(|c| c.used_len).collect();
    assert_eq!(used[0], 0);
    assert_eq!(used[3], 0);
    let status = |i: usize| response_header(&done[i]);
    assert_eq!(used[1], 16);
    assert_eq!(status(1), (Status::NoSys as u32, 0x1234));
    assert_eq!(used[2], 16);
    assert_eq!(status(2).0, Status::Fault as u32);
    assert_eq!(used[4], 16);
    assert_eq!(status(4), (Status::Inval as u32, 6));
    assert_eq!(used[5] as usize, RESP_HDR_SIZE + INFO_SIZE);
    assert_eq!(status(5), (0, 5));
    assert_eq!(
        (used_idx(&vm).wrapping_sub(before), vm.driver().in_flight(0)),
        (6, 0),
        "each chain came back once"
    );
    d.stop();
}

#[test]
fn lock_contention_parks_on_one_queue_while_another_serves() {
    let (d, vm) = two_queue_daemon();
    let (obj, a, b) = vm.lock_held();
    // b waits for the lock on controlq2 (queue 2).
    let parked = vm.send(2, &lock_request(b, obj));
    // The controlq keeps serving meanwhile, and TRY is EBUSY at once.
    assert_eq!(
        vm.try_lock(b, obj),
        Err(Status::Busy),
        "the context already has a waiting request"
    );
    assert!(vm.info().version == 1);
    assert!(vm.try_wait(&parked).is_none(), "still parked");
    // Unlocking on the controlq completes the parked chain on queue 2.
    assert_eq!(vm.unlock(a, obj), Ok(Reply::Empty));
    assert_eq!(vm.wait(parked), Ok(Reply::Empty));
    assert_eq!(vm.unlock(b, obj), Ok(Reply::Empty));
    d.stop();
}

#[test]
fn transfers_copy_through_the_chain_and_are_bounded() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, ram(48 << 20));
    let obj = vm.create(4 * PAGE).object;
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(vm.transfer_to(obj, 100, &data), Ok(Reply::Empty));
    assert_eq!(vm.transfer_from(obj, 100, data.len() as u64), data);
    // Beyond the object: EINVAL.
    assert_eq!(
        vm.transfer_to(obj, 4 * PAGE - 1, &[1, 2]),
        Err(Status::Inval)
    );
    // Longer than the daemon's 16 MiB limit, even with room for it.
    let limit = vhost_device_dmabuf::backend::TRANSFER_MAX;
    let big = vm
        .driver()
        .submit_sized(
            0,
            vm.driver().next_tag(),
            &Request::TransferFromHost {
                object: obj,
                offset: 0,
                len: limit + 1,
            },
            (RESP_HDR_SIZE as u64 + limit + 1) as usize,
        )
        .expect("the chain");
    assert_eq!(vm.wait(big), Err(Status::Inval));
    d.stop();
}

#[test]
fn guest_pages_objects_live_in_guest_ram() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, ram(32 << 20));
    let pool = vm.driver().pool();
    let pages = [
        pool.alloc(PAGE, PAGE).expect("a page").gpa,
        pool.alloc(2 * PAGE, PAGE).expect("two pages").gpa,
    ];
    let mem = vm.driver().memory();
    let entries = vec![
        Segment {
            addr: pages[1],
            len: 2 * PAGE,
        },
        Segment {
            addr: pages[0],
            len: PAGE,
        },
    ];
    let obj = match vm.call(
        0,
        &Request::Create {
            size: 3 * PAGE,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(entries.clone()),
        },
    ) {
        Ok(Reply::Object(o)) => o,
        other => panic!("CREATE GUEST_PAGES: {other:?}"),
    };
    assert_ne!(obj.obj_flags & obj_flags::GUEST_PAGES, 0);
    // The copy path writes guest RAM: object offset 2 pages is pages[0].
    assert_eq!(
        vm.transfer_to(obj.object, 2 * PAGE + 8, b"guest!"),
        Ok(Reply::Empty)
    );
    let mut back = [0u8; 6];
    mem.read(pages[0] + 8, &mut back).expect("guest RAM");
    assert_eq!(&back, b"guest!");
    mem.write(pages[1], b"from the guest").expect("guest RAM");
    assert_eq!(vm.transfer_from(obj.object, 0, 14), b"from the guest");

    let att = vm.attach(obj.object, false);
    let m = vm.map(att, Direction::Bidirectional, 8);
    assert_eq!(m.space, AddressSpace::GuestPhys);
    assert_eq!(m.entries, entries);

    // Entries outside guest RAM: EFAULT.
    assert_eq!(
        vm.call(
            0,
            &Request::Create {
                size: PAGE,
                dynamic: false,
                cache_mapping: false,
                guest_pages: Some(vec![Segment {
                    addr: 64 << 20,
                    len: PAGE
                }]),
            }
        ),
        Err(Status::Fault)
    );
    d.stop();
}

#[test]
fn removing_guest_memory_revokes_objects_over_it() {
    let d = TestDaemon::start(|_| {});
    // Region 0 holds the rings; region 1 the object's pages.
    let mut vm = d.vm(
        0,
        VmmOptions {
            ram: vec![(0, 16 << 20), (1 << 30, 1 << 20)],
            ..VmmOptions::default()
        },
    );
    let obj = match vm.call(
        0,
        &Request::Create {
            size: PAGE,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(vec![Segment {
                addr: 1 << 30,
                len: PAGE,
            }]),
        },
    ) {
        Ok(Reply::Object(o)) => o.object,
        other => panic!("CREATE: {other:?}"),
    };
    // A buffer too short for an event comes back empty and unused.
    vm.post_event_buffer(16);
    vm.post_event_buffer(32);
    assert_eq!(vm.driver().poll_events().expect("the eventq"), []);

    // A new memory table without region 1.
    let keep = vm.memory_regions().expect("the regions")[..1].to_vec();
    vm.frontend().set_mem_table(&keep).expect("SET_MEM_TABLE");

    // Both buffers come back: the short one empty, the other with the event.
    let mut records = Vec::new();
    while records.len() < 2 {
        records.push(
            vm.driver()
                .next_event(TIMEOUT)
                .expect("the eventq")
                .expect("both eventq buffers back in time"),
        );
    }
    let (empty, full): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.used_len == 0);
    assert_eq!((empty.len(), full.len()), (1, 1), "one empty, one event");
    assert_eq!(full[0].used_len as usize, EVENT_SIZE);
    let event = full[0].event.expect("a known event");
    assert_eq!(event.kind, EventType::Revoked);
    assert_eq!(event.object, obj);
    assert_eq!(
        vm.transfer_to(obj, 0, b"x"),
        Err(Status::NoEnt),
        "a revoked handle is ENOENT"
    );
    assert_eq!(vm.release(obj), Ok(Reply::Empty));
    d.stop();
}

#[test]
fn oversized_undecodable_and_cancelled_chains_come_back_once_and_the_batch_goes_on() {
    let d = TestDaemon::start(|c| c.request_queues = 1);
    let vm = d.vm(0, ram(48 << 20));
    let (obj, _a, b) = vm.lock_held();
    let info_len = (RESP_HDR_SIZE + INFO_SIZE) as u32;

    // 1. A GET_INFO with 1 MiB of readable bytes: only its header is used.
    let mut big = encode_request(11, &Request::GetInfo);
    big.resize(1 << 20, 0xa5);
    let c1 = RawChain::new().readable(big).writable(info_len);
    // 2. A TRANSFER_TO_HOST carrying more than the daemon's bound: EINVAL.
    let limit = vhost_device_dmabuf::backend::TRANSFER_MAX;
    let mut huge = encode_request(
        12,
        &Request::TransferToHost {
            object: obj,
            offset: 0,
            data: Vec::new(),
        },
    );
    huge[REQ_HDR_SIZE + 16..REQ_HDR_SIZE + 24].copy_from_slice(&(limit + 1).to_le_bytes());
    huge.resize(huge.len() + limit as usize + 1, 0);
    let c2 = RawChain::new().readable(huge).writable(16);
    // 3. A CREATE naming more entries than it carries: EINVAL.
    let mut create = encode_request(
        13,
        &Request::Create {
            size: PAGE,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(vec![Segment {
                addr: 1 << 20,
                len: PAGE,
            }]),
        },
    );
    create[REQ_HDR_SIZE + 8..REQ_HDR_SIZE + 12].copy_from_slice(&100_000u32.to_le_bytes());
    let c3 = RawChain::new().readable(create).writable(64);
    // 4. A LOCK that parks behind `a`, 5. the CANCEL of its tag.
    let lock = encode_request(14, &lock_request(b, obj));
    let c4 = RawChain::new().readable(lock).writable(16);
    let cancel = encode_request(15, &Request::Cancel { tag: 14 });
    let c5 = RawChain::new().readable(cancel).writable(16);
    // 6. A good request at the end.
    let info = encode_request(16, &Request::GetInfo);
    let c6 = RawChain::new().readable(info).writable(info_len);

    let before = used_idx(&vm);
    let done = run_batch(&vm, 0, vec![c1, c2, c3, c4, c5, c6]);
    let used: Vec<u32> = done.iter().map(|c| c.used_len).collect();
    let header = |i: usize| response_header(&done[i]);
    assert_eq!(used[0], info_len);
    assert_eq!(header(0), (0, 11));
    assert_eq!((used[1], header(1)), (16, (Status::Inval as u32, 12)));
    assert_eq!((used[2], header(2)), (16, (Status::Inval as u32, 13)));
    assert_eq!((used[3], header(3)), (16, (Status::Canceled as u32, 14)));
    assert_eq!((used[4], header(4)), (16, (0, 15)));
    assert_eq!((used[5], header(5)), (info_len, (0, 16)));
    assert_eq!(
        used_idx(&vm).wrapping_sub(before),
        6,
        "each chain came back exactly once"
    );
    assert_eq!(vm.driver().in_flight(0), 0);
    d.stop();
}

#[test]
fn used_queue_signals_follow_the_drivers_used_event() {
    let (d, vm) = two_queue_daemon();
    assert_eq!(vm.info().version, 1);
    let call = vm
        .notifier()
        .call_fd(0)
        .expect("the controlq's call eventfd");
    let _ = call.read();
    // The driver wants a call only once the used index passes used + 1.
    let used = used_idx(&vm);
    vm.driver()
        .set_used_event(0, used.wrapping_add(1))
        .expect("used_event");
    let first = vm.send(0, &Request::GetInfo);
    poll_until("the first answer", || {
        (used_idx(&vm) == used.wrapping_add(1)).then_some(())
    });
    // A round trip on another queue: the worker finished the first batch.
    assert_eq!(vm.call(2, &Request::GetInfo).map(|_| ()), Ok(()));
    assert!(
        call.read().is_err(),
        "no call before the driver's used_event"
    );
    let second = vm.send(0, &Request::GetInfo);
    poll_until("the call", || call.read().ok());
    assert!(vm.try_wait(&first).is_some());
    assert!(vm.try_wait(&second).is_some());
    d.stop();
}

#[test]
fn a_ring_whose_avail_index_counts_unreadable_entries_does_not_hold_the_worker() {
    let size = 32 << 20;
    let d = TestDaemon::start(|c| c.request_queues = 2);
    let mut vm = d.vm(0, ram(size));
    assert_eq!(vm.info().version, 1);
    vm.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    // The controlq's avail flags and index are RAM's last four bytes; its
    // entries lie past RAM. The index says one chain is there.
    let mut layout = vm.driver().ring_layouts()[0];
    layout.avail = size - 4;
    vm.guest_memory()
        .write_obj(1u16.to_le(), GuestAddress(size - 2))
        .expect("avail.idx");
    // The worker looks (when the ring starts, or at the kick) and lets
    // go: the other queue is served, the front-end still gets the ring's
    // base, and the back-end took nothing it could not read.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        vm.program_ring(0, layout, 0).expect("the ring set up");
        vm.notifier()
            .kick_fd(0)
            .expect("the controlq's kick eventfd")
            .write(1)
            .expect("kick");
        let other = vm.call(2, &Request::GetInfo).map(|_| ());
        let bases = vm.stop_vrings();
        let _ = tx.send((other, bases, vm));
    });
    let Ok((other, bases, vm)) = rx.recv_timeout(std::time::Duration::from_secs(30)) else {
        // Stopping the daemon would wait for the stuck worker too.
        std::mem::forget(d);
        panic!("GET_VRING_BASE not answered: the worker holds the ring");
    };
    assert_eq!(other, Ok(()), "the other queue is served meanwhile");
    assert_eq!(bases.expect("GET_VRING_BASE")[0], 0, "no chain was taken");
    drop(vm);
    d.stop();
}

/// A driver that makes a head available again while its chain is in
/// flight (here: parked behind a lock, its request rewritten between the
/// two) grows the device's chain table; past every ring full of chains,
/// the rest come back unread, `used.len` 0, until chains leave the table.
#[test]
fn heads_made_available_again_while_in_flight_come_back_unread_past_every_ring_full() {
    const SIZE: u16 = 16;
    let d = TestDaemon::start(|c| {
        c.request_queues = 2;
        c.max_queue_size = SIZE;
    });
    let mut vm = d.vm(
        0,
        VmmOptions {
            queue_size: SIZE,
            ..ram(32 << 20)
        },
    );
    // Every ring full: 2 request queues of 16.
    let full = 2 * usize::from(SIZE);
    let (obj, _holder, _) = vm.lock_held();
    let contexts: Vec<u64> = (0..full + 2).map(|_| vm.acquire()).collect();
    vm.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    // The controlq, written by hand: descriptor 0 is a LOCK request,
    // descriptor 1 its response; head 0 is made available again and again.
    let layout = vm.driver().ring_layouts()[0];
    let (request_at, response_at) = (0x10_0000, 0x10_1000);
    let mem = vm.guest_memory().clone();
    let mut table = Vec::new();
    for (addr, len, flags, next) in [(request_at, 64u32, 1u16, 1u16), (response_at, 64, 2, 0)] {
        table.extend_from_slice(&u64::to_le_bytes(addr));
        table.extend_from_slice(&u32::to_le_bytes(len));
        table.extend_from_slice(&u16::to_le_bytes(flags));
        table.extend_from_slice(&u16::to_le_bytes(next));
    }
    mem.write_slice(&table, GuestAddress(layout.desc))
        .expect("descriptors");
    let zeros = vec![0u8; 4096];
    mem.write_slice(
        &zeros[..6 + 2 * usize::from(SIZE)],
        GuestAddress(layout.avail),
    )
    .expect("avail ring");
    mem.write_slice(
        &zeros[..6 + 8 * usize::from(SIZE)],
        GuestAddress(layout.used),
    )
    .expect("used ring");
    vm.program_ring(0, layout, 0).expect("the ring set up");
    let avail_event = GuestAddress(layout.used + 4 + 8 * u64::from(SIZE));
    let used_idx = GuestAddress(layout.used + 2);
    let kick = vm
        .notifier()
        .kick_fd(0)
        .expect("the controlq's kick eventfd");
    for (i, &ctx) in contexts.iter().enumerate() {
        let request = encode_request(i as u64, &lock_request(ctx, obj));
        mem.write_slice(&request, GuestAddress(request_at))
            .expect("request");
        let idx = i as u16 + 1;
        let slot = GuestAddress(layout.avail + 4 + 2 * u64::from(i as u16 % SIZE));
        mem.write_obj(0u16, slot).expect("avail slot");
        mem.write_obj(idx.to_le(), GuestAddress(layout.avail + 2))
            .expect("avail.idx");
        kick.write(1).expect("kick");
        // The device took it (and read its request) when it asks to be
        // kicked past it.
        poll_until("the device to take the chain", || {
            (u16::from_le(mem.read_obj(avail_event).expect("avail_event")) == idx).then_some(())
        });
    }
    // The first `full` chains park (each context waits for the lock);
    // the two past them come back unread.
    let used: u16 = u16::from_le(mem.read_obj(used_idx).expect("used.idx"));
    assert_eq!(used, 2, "two chains came back");
    for i in 0..2u64 {
        let elem = GuestAddress(layout.used + 4 + 8 * i);
        let id = u32::from_le(mem.read_obj(elem).expect("used id"));
        let len = u32::from_le(mem.read_obj(GuestAddress(elem.0 + 4)).expect("used len"));
        assert_eq!((id, len), (0, 0), "head 0, unread");
    }
    // Until chains leave the table, every queue of this guest gets its
    // chains back unread.
    let info = RawChain::new()
        .readable(encode_request(7, &Request::GetInfo))
        .writable(64);
    let back = run_batch(&vm, 2, vec![info]);
    assert!(back[0].written.is_empty(), "unread: {:?}", back[0]);
    // Stopping the ring returns the parked chains (ECANCELED): the
    // device serves again.
    vm.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(vm.call(2, &Request::GetInfo).map(|_| ()), Ok(()));
    drop(vm);
    d.stop();
}
