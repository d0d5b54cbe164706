// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Feature and protocol negotiation, the config space and the shared
//! memory region, over the daemon's real vhost-user socket (contract
//! sections 1 to 3).

mod common;

use common::daemon::*;
use dmabuf_guest_tests::vmm::{ChannelKind, LoopbackVmm, VmmOptions};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_dmabuf_protocol::{caps, Config as ConfigSpace, CONFIG_SIZE};

#[test]
fn features_and_protocol_features_are_the_contracts() {
    let d = TestDaemon::start(|_| {});
    let mut fe = Frontend::connect(d.socket(0), 2).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_eq!(
        features,
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
    );
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let expected = device_protocol_features();
    assert_eq!(pf, expected);
    assert_eq!(pf.bits() & (1 << 18 | 1 << 22), 1 << 18 | 1 << 22);
    fe.set_protocol_features(pf).expect("SET_PROTOCOL_FEATURES");
    assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 2);
    let shm = fe.get_shmem_config().expect("GET_SHMEM_CONFIG");
    assert_eq!(shm.nregions, 1);
    assert_eq!({ shm.memory_sizes }[0], 1 << 20);
    d.stop();
}

#[test]
fn no_window_means_no_shmem_and_queues_count_the_eventq() {
    let d = TestDaemon::start(|c| {
        c.shm_size = 0;
        c.request_queues = 3;
    });
    let mut fe = Frontend::connect(d.socket(0), 4).expect("connect");
    fe.set_owner().expect("SET_OWNER");
    fe.get_features().expect("GET_FEATURES");
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(!pf.contains(VhostUserProtocolFeatures::SHMEM));
    fe.set_protocol_features(pf).expect("SET_PROTOCOL_FEATURES");
    assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 4);
    d.stop();
}

fn config(vm: &mut LoopbackVmm, offset: u32, size: u32) -> Result<Vec<u8>, vhost::Error> {
    let buf = vec![0u8; size as usize];
    vm.frontend()
        .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
        .map(|(_, bytes)| bytes)
}

#[test]
fn config_reads_have_the_requested_size_and_zeros_past_the_struct() {
    let (d, mut vm) = two_queue_daemon();
    let full = config(&mut vm, 0, CONFIG_SIZE as u32).expect("whole config");
    let c = ConfigSpace::from_bytes(&full).expect("24 bytes");
    assert_eq!(c.num_queues, 3);
    assert!(c.page_size >= 4096 && c.page_size.is_power_of_two());
    assert_eq!(
        c.shm_size,
        1 << 20,
        "SHMEM acked and a channel: the window is live"
    );
    assert_eq!(c.max_segments, 1024);
    assert_eq!(&full[20..24], &[0; 4], "reserved");

    // QEMU asks for its own config size: the rest reads as zero.
    let bigger = config(&mut vm, 0, 64).expect("64 bytes");
    assert_eq!(&bigger[..CONFIG_SIZE], &full[..]);
    assert!(bigger[CONFIG_SIZE..].iter().all(|&b| b == 0));
    // A field on its own.
    let shm = config(&mut vm, 8, 8).expect("shm_size");
    assert_eq!(u64::from_le_bytes(shm.try_into().expect("8")), 1 << 20);
    // Past the structure, up to the largest offset vhost-user allows.
    assert_eq!(config(&mut vm, 100, 16).expect("zeros"), vec![0; 16]);
    assert_eq!(config(&mut vm, 4088, 8).expect("zeros"), vec![0; 8]);
    // Out of range for the message itself: refused by the front-end
    // library before it is sent, and the connection goes on.
    assert!(config(&mut vm, 4090, 16).is_err());
    assert_eq!(vm.info().num_queues, 3);

    // Writes are ignored (and acked): the config reads as before.
    vm.frontend()
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0xff; 24])
        .expect("SET_CONFIG is accepted");
    vm.frontend()
        .set_config(20, VhostUserConfigFlags::empty(), &[0xff; 64])
        .expect("SET_CONFIG past the structure");
    assert_eq!(
        config(&mut vm, 0, CONFIG_SIZE as u32).expect("config"),
        full
    );
    d.stop();
}

#[test]
fn without_shmem_the_window_is_not_live() {
    let d = TestDaemon::start(|_| {});
    let mut vm = d.vm(
        0,
        VmmOptions::default().without_protocol(VhostUserProtocolFeatures::SHMEM),
    );
    let full = config(&mut vm, 0, 24).expect("config");
    assert_eq!(ConfigSpace::from_bytes(&full).expect("config").shm_size, 0);
    let info = vm.info();
    assert_eq!(info.caps & caps::HOST_SHM, 0);
    assert_eq!(info.shm_size, 0);
    assert_ne!(info.caps & caps::SHARED_OBJECTS, 0);
    assert_ne!(info.caps & caps::GUEST_PAGES, 0);
    assert_ne!(info.caps & caps::TRANSFER, 0);
    d.stop();
}

#[test]
fn get_info_reports_what_the_front_end_made_live() {
    let d = TestDaemon::start(|_| {});
    let vm = d.vm(0, VmmOptions::default());
    let info = vm.info();
    assert_eq!(info.version, 1);
    assert_eq!(info.num_queues, 2);
    assert_eq!(info.shm_size, 1 << 20);
    for c in [
        caps::HOST_SHM,
        caps::GUEST_PAGES,
        caps::TRANSFER,
        caps::SHARED_OBJECTS,
        caps::FENCES,
    ] {
        assert_ne!(info.caps & c, 0, "cap {c:#x}");
    }
    assert_eq!(info.caps & caps::REAL_DMABUF, 0, "memfd provider");
    assert_eq!(info.caps & caps::HOST_EXPORTS, 0, "no control socket");
    drop(vm);

    // No back-end channel: neither the window nor shared objects work.
    let vm = d.vm(0, VmmOptions::default().with_channel(ChannelKind::None));
    let info = vm.info();
    assert_eq!(info.caps & (caps::HOST_SHM | caps::SHARED_OBJECTS), 0);
    d.stop();
}
