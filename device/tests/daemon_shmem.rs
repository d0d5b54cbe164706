// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The shared memory window over the real socket: `MAP_SHM` places the
//! object's fd with `VHOST_USER_BACKEND_SHMEM_MAP`, checked on the
//! front-end side (contract sections 1, 7.3, 7.5 and 10).

mod common;

use common::daemon::*;
use dmabuf_guest_tests::vmm::channel::backend_req::{SHMEM_MAP, SHMEM_UNMAP};
use dmabuf_guest_tests::vmm::{ChannelKind, VmmOptions};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

#[test]
fn map_shm_is_placed_by_shmem_map_first_fit_and_removed_by_unmap() {
    let d = TestDaemon::start(|c| c.shm_size = 4 * PAGE);
    // The vhost crate's own front-end handler serves the channel.
    let vm = d.vm(0, VmmOptions::default().with_channel(ChannelKind::Crate));
    let a = vm.create(2 * PAGE).object;
    let b = vm.create(PAGE).object;
    let c = vm.create(2 * PAGE).object;
    let pattern: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(vm.transfer_to(a, 0, &pattern), Ok(Reply::Empty));

    assert_eq!(
        vm.map_shm(a, true),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );
    // The reply came after the front-end mapped it: the map is there.
    {
        let chan = vm.crate_channel().expect("crate channel");
        let log = chan.log();
        assert_eq!(log.maps.len(), 1);
        let m = &log.maps[0];
        assert_eq!(
            (m.shmid, m.fd_offset, m.shm_offset, m.len),
            (0, 0, 0, 2 * PAGE)
        );
        assert_eq!(m.flags, 1, "WRITABLE");
        // The fd is the object: its bytes are what the guest copied in.
        assert_eq!(read_fd(&m.file, 0, pattern.len()), pattern);
    }
    assert_eq!(
        vm.map_shm(b, false),
        Ok(Reply::Shm {
            shm_offset: 2 * PAGE,
            len: PAGE
        })
    );
    // Full window.
    assert_eq!(vm.map_shm(c, false), Err(Status::NoSpc));
    // One placement per object: another writability is EBUSY, the same
    // one counts a use.
    assert_eq!(vm.map_shm(a, false), Err(Status::Busy));
    assert_eq!(
        vm.map_shm(a, true),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );

    // A peer-to-peer importer maps the window offset.
    let att = vm.attach(a, true);
    let map = vm.map(att, Direction::Bidirectional, 4);
    assert_eq!(map.space, AddressSpace::Shm);
    assert_eq!(
        map.entries,
        [Segment {
            addr: 0,
            len: 2 * PAGE
        }]
    );
    // Two uses; the SHM mapping keeps the last one.
    assert_eq!(
        vm.call(0, &Request::UnmapShm { object: a }),
        Ok(Reply::Empty)
    );
    assert_eq!(
        vm.call(0, &Request::UnmapShm { object: a }),
        Err(Status::Busy)
    );
    assert_eq!(vm.unmap(map.mapping), Ok(Reply::Empty));
    assert_eq!(
        vm.call(0, &Request::UnmapShm { object: a }),
        Ok(Reply::Empty)
    );
    {
        let chan = vm.crate_channel().expect("crate channel");
        assert_eq!(chan.log().unmaps, [(0, 2 * PAGE)]);
    }
    // The freed range is reused first.
    assert_eq!(
        vm.map_shm(c, false),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );
    // Releasing the guest's state takes its objects out of the window.
    assert_eq!(vm.call(0, &Request::ResetSession), Ok(Reply::Empty));
    let chan = vm.crate_channel().expect("crate channel");
    let mut unmaps = poll_until("SHMEM_UNMAPs of the reset", || {
        let log = chan.log();
        (log.unmaps.len() == 3).then(|| log.unmaps.clone())
    });
    unmaps.sort_unstable();
    assert_eq!(unmaps, [(0, 2 * PAGE), (0, 2 * PAGE), (2 * PAGE, PAGE)]);
    d.stop();
}

#[test]
fn a_refused_shmem_map_is_eio_and_leaves_nothing_placed() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, VmmOptions::default());
    let obj = vm.create(PAGE).object;
    vm.frontend_state().refuse(SHMEM_MAP);
    assert_eq!(vm.map_shm(obj, true), Err(Status::Io));
    // Nothing placed: RELEASE is not EBUSY, and no SHMEM_UNMAP was sent.
    assert_eq!(vm.release(obj), Ok(Reply::Empty));
    let unmaps = channel_headers(&vm)
        .iter()
        .filter(|&&(request, _)| request == SHMEM_UNMAP)
        .count();
    assert_eq!(unmaps, 0);
    d.stop();
}

#[test]
fn without_shmem_map_shm_is_eopnotsupp_and_map_is_in_object_space() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(
        0,
        VmmOptions::default().without_protocol(VhostUserProtocolFeatures::SHMEM),
    );
    let obj = vm.create(PAGE).object;
    assert_eq!(vm.map_shm(obj, false), Err(Status::NotSupported));
    let att = vm.attach(obj, true);
    assert_eq!(
        vm.map(att, Direction::FromDevice, 4).space,
        AddressSpace::Object
    );
    d.stop();
}
