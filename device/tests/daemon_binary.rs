// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real binary: started as the README says, driven by the vhost
//! crate's front-end, reconnected, and stopped with SIGTERM.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::daemon::*;
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use vhost::VhostBackend;
use virtio_dmabuf_protocol::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-dmabuf");

fn fds_of(child: &Child) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .expect("the daemon's fds")
        .count()
}

/// The daemon's idle fd count: the same on reads 50 ms apart (a daemon
/// still starting up, on a loaded machine, must not set a low baseline).
fn idle_fds(child: &Child) -> usize {
    let mut last = fds_of(child);
    poll_until("the daemon's fd count to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = fds_of(child);
        let settled = now == last;
        last = now;
        settled.then_some(now)
    })
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill only sends a signal to the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    poll_until("the daemon to exit", || child.try_wait().expect("try_wait"))
}

fn spawn(socket: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the daemon");
    poll_until("the socket to appear", || {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the daemon exited early: {status}");
        }
        socket.exists().then_some(())
    });
    child
}

#[test]
fn the_binary_serves_reconnects_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let mut child = spawn(&socket, &["--queues", "2"]);
    let baseline = idle_fds(&child);
    let mut old = 0;
    for round in 0..3 {
        let vm = LoopbackVmm::connect(&socket, VmmOptions::default()).expect("connect");
        assert_eq!(vm.negotiated().num_queues, 3);
        let info = vm.info();
        assert_eq!(info.provider, ProviderKind::Memfd as u32, "memfd default");
        assert_eq!(info.num_queues, 3);
        assert_eq!(info.shm_size, 256 << 20, "the default window");
        if old != 0 {
            assert_eq!(
                vm.call(0, &Request::Release { object: old }),
                Err(Status::NoEnt),
                "round {round}: nothing left from the last front-end"
            );
        }
        let obj = vm.create(4096).object;
        let (a, b) = (vm.acquire(), vm.acquire());
        assert_eq!(vm.call(0, &lock_request(a, obj)), Ok(Reply::Empty));
        let parked = vm.send(2, &lock_request(b, obj));
        vm.wait_taken(2);
        assert!(vm.try_wait(&parked).is_none());
        old = obj;
        drop(vm);
        poll_until(&format!("the daemon's fds back to {baseline}"), || {
            (fds_of(&child) == baseline).then_some(())
        });
    }
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed");
}

#[test]
fn sigint_with_a_front_end_connected_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm");
    let sockets = [dir.path().join("vm0"), dir.path().join("vm1")];
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--socket-count", "2"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");
    poll_until("both sockets", || {
        sockets.iter().all(|s| s.exists()).then_some(())
    });
    let mut vm = LoopbackVmm::connect(&sockets[1], VmmOptions::default()).expect("connect");
    assert_eq!(vm.info().version, 1);
    signal(&child, libc::SIGINT);
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(sockets.iter().all(|s| !s.exists()));
    assert!(
        vm.frontend().get_features().is_err(),
        "the front-end was hung up"
    );
}

#[test]
fn bad_arguments_exit_with_usage_errors_and_help_succeeds() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--shm-size") && help.contains("--export"));
    let out = Command::new(BIN)
        .args(["--socket-path", "/tmp/x", "--queues", "0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--queues"));
    let out = Command::new(BIN).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "--socket-path is required");
}

#[test]
fn exports_given_on_the_command_line_are_listed_by_ctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dmabuf.sock");
    let control = dir.path().join("control.sock");
    let buffer = dir.path().join("camera-frame");
    std::fs::write(&buffer, vec![0x42u8; 8192]).expect("buffer file");
    let export = format!("camera={},read-only", buffer.display());
    let mut child = spawn(
        &socket,
        &[
            "--control-socket",
            control.to_str().expect("utf-8"),
            "--export",
            &export,
        ],
    );
    poll_until("the control socket", || control.exists().then_some(()));
    let vm = LoopbackVmm::connect(&socket, VmmOptions::default()).expect("connect");
    let info = vm.info();
    assert_ne!(info.caps & caps::HOST_EXPORTS, 0);
    let o = match vm.call(
        0,
        &Request::Open {
            uuid: None,
            name: b"camera".to_vec(),
        },
    ) {
        Ok(Reply::Object(o)) => o,
        other => panic!("OPEN camera: {other:?}"),
    };
    assert_eq!(o.size, 8192);
    assert_eq!(o.obj_flags & obj_flags::WRITABLE, 0, "read-only export");
    assert_eq!(vm.transfer_from(o.object, 100, 3), [0x42; 3]);

    let out = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(&control)
        .args(["list", "--json"])
        .output()
        .expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let objects = list["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["export"], "camera");
    assert_eq!(objects[0]["guests"], serde_json::json!([0]));

    drop(vm);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    assert!(!socket.exists() && !control.exists());
}
