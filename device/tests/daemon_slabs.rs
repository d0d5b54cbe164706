// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Small host objects hold no open file: they are extents of shared slabs
//! (`provider/slab.rs`), so one guest holds far more of them than the
//! open-file limit allows, and an object whose fd is handed out is first
//! promoted to a memfd of its own (`exporter/objects.rs`, "fds"). The real
//! binary under a lowered `RLIMIT_NOFILE` (prlimit), over a real socket,
//! with the daemon's open files and mappings read from `/proc`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use virtio_dmabuf_protocol::Status;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-dmabuf");

/// Enough for one guest's fixed cost and a small fd quota.
const LIMIT: u64 = 1024;

/// Three times the open-file limit.
const MANY: u64 = 3 * LIMIT;

const PAGE: u64 = 4096;

/// What `/proc/PID/maps` calls a slab.
const SLAB_NAME: &str = "vhost-device-dmabuf-slab";

/// The daemon under `prlimit`, which execs it: the child is the daemon.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(socket: &Path, extra: &[&str]) -> Daemon {
        let child = Command::new("prlimit")
            .arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .arg(BIN)
            .arg("--socket-path")
            .arg(socket)
            .args(["--max-objects", &(MANY + 16).to_string()])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .expect("prlimit and the daemon");
        wait_for("the socket", || socket.exists());
        Daemon { child }
    }

    fn proc(&self, what: &str) -> String {
        format!("/proc/{}/{what}", self.child.id())
    }

    /// Open files of the daemon.
    fn fds(&self) -> usize {
        std::fs::read_dir(self.proc("fd"))
            .expect("/proc/PID/fd")
            .count()
    }

    /// Slabs the daemon has mapped.
    fn slabs(&self) -> usize {
        std::fs::read_to_string(self.proc("maps"))
            .expect("/proc/PID/maps")
            .lines()
            .filter(|l| l.contains(SLAB_NAME))
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill only sends SIGTERM to the child this test spawned.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(socket: &Path) -> LoopbackVmm {
    LoopbackVmm::connect(socket, VmmOptions::default()).expect("connect")
}

fn create(vm: &LoopbackVmm, size: u64) -> u64 {
    vm.driver()
        .create(size, 0)
        .expect("transport")
        .expect("CREATE")
        .object
}

fn write(vm: &LoopbackVmm, object: u64, data: &[u8]) {
    vm.driver()
        .transfer_to_host(object, 0, data)
        .expect("transport")
        .expect("TRANSFER_TO_HOST");
}

fn read(vm: &LoopbackVmm, object: u64, len: u64) -> Vec<u8> {
    vm.driver()
        .transfer_from_host(object, 0, len)
        .expect("transport")
        .expect("TRANSFER_FROM_HOST")
}

fn release(vm: &LoopbackVmm, object: u64) {
    vm.driver()
        .release(object)
        .expect("transport")
        .expect("RELEASE");
}

/// 16 bytes that name object number `i`.
fn stamp(i: u64) -> Vec<u8> {
    [i.to_le_bytes(), (!i).to_le_bytes()].concat()
}

#[test]
fn more_small_objects_than_open_files_create_transfer_and_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let d = Daemon::start(&socket, &[]);
    let vm = connect(&socket);
    let idle = d.fds();

    let objects: Vec<u64> = (0..MANY)
        .map(|i| {
            let o = create(&vm, PAGE);
            write(&vm, o, &stamp(i));
            o
        })
        .collect();
    assert!(
        d.fds() <= idle + 2,
        "{MANY} objects under a limit of {LIMIT} open files hold none: {} open, {idle} before",
        d.fds()
    );
    assert_eq!(d.slabs(), 1, "16,384 objects of 4 KiB share one slab");
    for (i, &o) in objects.iter().enumerate() {
        let data = read(&vm, o, PAGE);
        assert_eq!(data[..16], stamp(i as u64), "object {i}");
        assert!(data[16..].iter().all(|&b| b == 0), "object {i}");
    }
    for &o in &objects {
        release(&vm, o);
    }
    assert_eq!(d.fds(), idle, "no fd leaked");
}

#[test]
fn a_released_extent_is_handed_out_again_zero_filled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let _d = Daemon::start(&socket, &[]);
    let vm = connect(&socket);
    let keep = create(&vm, 2 * PAGE);
    for round in 0..4u8 {
        let o = create(&vm, 2 * PAGE);
        assert!(
            read(&vm, o, 2 * PAGE).iter().all(|&b| b == 0),
            "round {round}: a fresh object reads zeros"
        );
        write(&vm, o, &vec![round + 1; 2 * PAGE as usize]);
        release(&vm, o);
    }
    assert!(read(&vm, keep, 2 * PAGE).iter().all(|&b| b == 0));
}

#[test]
fn an_object_placed_in_the_window_keeps_its_bytes_and_sees_later_transfers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let d = Daemon::start(&socket, &[]);
    let vm = connect(&socket);
    let neighbour = create(&vm, PAGE);
    write(&vm, neighbour, b"the neighbour's bytes");
    let o = create(&vm, 2 * PAGE);
    write(&vm, o, b"before the window");
    let idle = d.fds();

    let (offset, len) = vm
        .driver()
        .map_shm(o, true)
        .expect("transport")
        .expect("MAP_SHM");
    assert_eq!(len, 2 * PAGE);
    assert_eq!(d.fds(), idle + 1, "promoted to a memfd of its own");
    let window = |at: u64, n: usize| vm.shm_read(offset + at, n).expect("window");
    assert_eq!(window(0, 17), b"before the window");
    assert!(
        window(17, (len - 17) as usize).iter().all(|&b| b == 0),
        "the window shows this object and nothing of its slab"
    );
    vm.driver()
        .transfer_to_host(o, PAGE, b"after the window")
        .expect("transport")
        .expect("TRANSFER_TO_HOST");
    assert_eq!(window(PAGE, 16), b"after the window");
    vm.shm_write(offset + 100, b"from the window")
        .expect("window");
    assert_eq!(&read(&vm, o, 115)[100..], b"from the window");
    assert_eq!(&read(&vm, neighbour, 21), b"the neighbour's bytes");

    vm.driver()
        .unmap_shm(o)
        .expect("transport")
        .expect("UNMAP_SHM");
    release(&vm, o);
    assert_eq!(d.fds(), idle, "the promoted memfd went with the object");
}

#[test]
fn promotion_past_the_fd_quota_is_enospc_and_small_objects_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let _d = Daemon::start(&socket, &["--max-fd-objects", "2"]);
    let vm = connect(&socket);
    let placed: Vec<u64> = (0..2)
        .map(|_| {
            let o = create(&vm, PAGE);
            vm.driver()
                .map_shm(o, false)
                .expect("transport")
                .expect("MAP_SHM within the fd quota");
            o
        })
        .collect();
    let third = create(&vm, PAGE);
    write(&vm, third, b"still here");
    assert_eq!(
        vm.driver().map_shm(third, false).expect("transport"),
        Err(Status::NoSpc)
    );
    assert_eq!(
        vm.driver().create(2 << 20, 0).expect("transport").err(),
        Some(Status::NoSpc),
        "an object above 1 MiB needs an fd too"
    );
    assert_eq!(&read(&vm, third, 10), b"still here");
    create(&vm, PAGE);
    for o in placed {
        vm.driver()
            .unmap_shm(o)
            .expect("transport")
            .expect("UNMAP_SHM");
        release(&vm, o);
    }
    vm.driver()
        .map_shm(third, false)
        .expect("transport")
        .expect("MAP_SHM once the quota has room");
}

#[test]
fn reset_releases_every_object_and_slab() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let d = Daemon::start(&socket, &[]);
    let mut vm = connect(&socket);
    let idle = d.fds();
    for size in [PAGE, 8 * PAGE, 1 << 20, 2 << 20] {
        for _ in 0..64 {
            create(&vm, size);
        }
    }
    let placed = create(&vm, PAGE);
    vm.driver()
        .map_shm(placed, true)
        .expect("transport")
        .expect("MAP_SHM");
    assert_eq!(d.slabs(), 3, "one slab for each size class used");
    assert!(d.fds() > idle + 64, "the objects above 1 MiB have fds");

    vm.reset().expect("RESET_DEVICE");
    assert_eq!(d.slabs(), 0);
    assert_eq!(d.fds(), idle);
    // And it serves again.
    let o = create(&vm, PAGE);
    assert!(read(&vm, o, PAGE).iter().all(|&b| b == 0));
}
