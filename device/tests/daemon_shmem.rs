//! The shared memory window over the real socket: `MAP_SHM` places the
//! object's fd with `VHOST_USER_BACKEND_SHMEM_MAP`, checked on the
//! front-end side (contract sections 1, 7.3, 7.5 and 10).

mod vhost_harness;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_harness::*;
use virtio_dmabuf_protocol::*;

const PAGE: u64 = 4096;

fn attach(vm: &mut Vm, object: u64, peer2peer: bool) -> u64 {
    match vm.call(
        0,
        &Request::Attach {
            object,
            dynamic_importer: false,
            peer2peer,
        },
    ) {
        Ok(Reply::Attachment(a)) => a,
        other => panic!("ATTACH: {other:?}"),
    }
}

fn map_shm(vm: &mut Vm, object: u64, writable: bool) -> Response {
    vm.call(0, &Request::MapShm { object, writable })
}

#[test]
fn map_shm_is_placed_by_shmem_map_first_fit_and_removed_by_unmap() {
    let d = TestDaemon::start(|c| c.shm_size = 4 * PAGE);
    // The vhost crate's own front-end handler serves the channel.
    let mut vm = Vm::connect_with(
        &d.socket(0),
        Options {
            channel: ChannelKind::Crate,
            ..Options::default()
        },
    );
    let a = vm.create(2 * PAGE).object;
    let b = vm.create(PAGE).object;
    let c = vm.create(2 * PAGE).object;
    let pattern: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(vm.transfer_to(a, 0, &pattern), Ok(Reply::Empty));

    assert_eq!(
        map_shm(&mut vm, a, true),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );
    // The reply came after the front-end mapped it: the map is there.
    {
        let chan = vm.crate_channel.as_ref().expect("crate channel");
        let log = chan.log.lock().expect("log");
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
        map_shm(&mut vm, b, false),
        Ok(Reply::Shm {
            shm_offset: 2 * PAGE,
            len: PAGE
        })
    );
    // Full window.
    assert_eq!(map_shm(&mut vm, c, false), Err(Status::NoSpc));
    // One placement per object: another writability is EBUSY, the same
    // one counts a use.
    assert_eq!(map_shm(&mut vm, a, false), Err(Status::Busy));
    assert_eq!(
        map_shm(&mut vm, a, true),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );

    // A peer-to-peer importer maps the window offset.
    let att = attach(&mut vm, a, true);
    let map = match vm.call(
        0,
        &Request::Map {
            attachment: att,
            dir: Direction::Bidirectional,
            max_entries: 4,
            ctx: 0,
        },
    ) {
        Ok(Reply::Map(m)) => m,
        other => panic!("MAP: {other:?}"),
    };
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
    assert_eq!(
        vm.call(
            0,
            &Request::Unmap {
                mapping: map.mapping,
                ctx: 0
            }
        ),
        Ok(Reply::Empty)
    );
    assert_eq!(
        vm.call(0, &Request::UnmapShm { object: a }),
        Ok(Reply::Empty)
    );
    {
        let chan = vm.crate_channel.as_ref().expect("crate channel");
        assert_eq!(chan.log.lock().expect("log").unmaps, [(0, 2 * PAGE)]);
    }
    // The freed range is reused first.
    assert_eq!(
        map_shm(&mut vm, c, false),
        Ok(Reply::Shm {
            shm_offset: 0,
            len: 2 * PAGE
        })
    );
    // Releasing the guest's state takes its objects out of the window.
    assert_eq!(vm.call(0, &Request::ResetSession), Ok(Reply::Empty));
    let chan = vm.crate_channel.as_ref().expect("crate channel");
    let mut unmaps = chan.wait_for("SHMEM_UNMAPs of the reset", |log| {
        (log.unmaps.len() == 3).then(|| log.unmaps.clone())
    });
    unmaps.sort_unstable();
    assert_eq!(unmaps, [(0, 2 * PAGE), (0, 2 * PAGE), (2 * PAGE, PAGE)]);
    d.stop();
}

#[test]
fn a_refused_shmem_map_is_eio_and_leaves_nothing_placed() {
    let d = TestDaemon::start(|_| {});
    let mut vm = Vm::connect(&d.socket(0));
    let obj = vm.create(PAGE).object;
    let peer = vm.channel.as_ref().expect("channel");
    peer.with(|st| st.refuse.push(9));
    assert_eq!(map_shm(&mut vm, obj, true), Err(Status::Io));
    // Nothing placed: RELEASE is not EBUSY, and no SHMEM_UNMAP was sent.
    assert_eq!(
        vm.call(0, &Request::Release { object: obj }),
        Ok(Reply::Empty)
    );
    let peer = vm.channel.as_ref().expect("channel");
    let unmaps = peer.with(|st| {
        st.messages
            .iter()
            .filter(|m| matches!(m, ChannelMsg::ShmemUnmap { .. }))
            .count()
    });
    assert_eq!(unmaps, 0);
    d.stop();
}

#[test]
fn without_shmem_map_shm_is_eopnotsupp_and_map_is_in_object_space() {
    let d = TestDaemon::start(|_| {});
    let mut vm = Vm::connect_with(
        &d.socket(0),
        Options {
            protocol: Options::default().protocol - VhostUserProtocolFeatures::SHMEM,
            ..Options::default()
        },
    );
    let obj = vm.create(PAGE).object;
    assert_eq!(map_shm(&mut vm, obj, false), Err(Status::NotSupported));
    let att = attach(&mut vm, obj, true);
    match vm.call(
        0,
        &Request::Map {
            attachment: att,
            dir: Direction::FromDevice,
            max_entries: 4,
            ctx: 0,
        },
    ) {
        Ok(Reply::Map(m)) => assert_eq!(m.space, AddressSpace::Object),
        other => panic!("MAP: {other:?}"),
    }
    d.stop();
}
