// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM the front-end removes is let go (section 10): the real binary
//! keeps no mapping of a region dropped from the memory table while a
//! guest-pages object over another region lives. Read from the daemon's
//! `/proc/PID/maps`, over the real socket.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use vhost::VhostBackend;
use virtio_dmabuf_protocol::{Segment, Status};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-dmabuf");
const PAGE: u64 = 4096;

/// The daemon, killed when dropped (also when an assertion fails, so a
/// failing test leaves no daemon behind).
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(socket: &Path) -> Spawned {
    let mut child = Spawned(
        Command::new(BIN)
            .arg("--socket-path")
            .arg(socket)
            .args(["--shm-size", "0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "the daemon exited"
        );
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The daemon's mappings of the loopback VMM's RAM region `index` (its
/// memfd is named `guest-ram-INDEX`).
fn mappings_of_region(child: &Spawned, index: usize) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.0.id())).expect("maps");
    let name = format!("/memfd:guest-ram-{index} ");
    maps.lines().filter(|l| l.contains(&name)).count()
}

fn create_over(vm: &LoopbackVmm, addr: u64) -> Result<u64, Status> {
    vm.driver()
        .create_guest(PAGE, false, &[Segment { addr, len: PAGE }])
        .expect("transport")
        .map(|o| o.object)
}

#[test]
fn removed_guest_ram_is_unmapped_while_other_guest_pages_objects_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let mut child = spawn(&socket);
    // Region 0 holds the rings, region 1 a live object; region 2 goes.
    let mut vm = LoopbackVmm::connect(
        &socket,
        VmmOptions {
            ram: vec![(0, 16 << 20), (1 << 30, 1 << 20), (2 << 30, 1 << 20)],
            shmem: false,
            ..VmmOptions::default()
        },
    )
    .expect("connect");
    let kept = create_over(&vm, 1 << 30).expect("an object over region 1");
    let gone = create_over(&vm, 2 << 30).expect("an object over region 2");
    assert_eq!(vm.driver().release(gone).expect("transport"), Ok(()));
    assert!(
        mappings_of_region(&child, 2) > 0,
        "the daemon maps region 2"
    );

    let keep = vm.memory_regions().expect("the regions")[..2].to_vec();
    vm.frontend().set_mem_table(&keep).expect("SET_MEM_TABLE");
    // The table change is acked before its reply; one request more makes
    // sure the worker has let its old view go.
    vm.driver()
        .get_info()
        .expect("transport")
        .expect("GET_INFO");
    assert_eq!(
        mappings_of_region(&child, 2),
        0,
        "region 2 is still mapped while an object over region 1 lives"
    );
    assert_eq!(
        vm.driver()
            .transfer_from_host(kept, 0, 4)
            .expect("transport"),
        Ok(vec![0; 4]),
        "the object over region 1 still works"
    );
    assert_eq!(
        create_over(&vm, 2 << 30),
        Err(Status::Fault),
        "region 2 is gone"
    );
    assert_eq!(vm.driver().release(kept).expect("transport"), Ok(()));
    vm.disconnect();
    // SAFETY: kill only sends SIGTERM to the child this test spawned.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    child.0.wait().expect("the daemon exits");
}
