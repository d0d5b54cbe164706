// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The open-file limit holds every guest at its quota of objects with fds
//! of their own: a guest that creates such objects up to its quota gets
//! `ENOSPC` (section 6) while another guest's `CREATE` still succeeds, and
//! a quota the limit cannot hold stops the daemon at start with what to
//! change. Small objects hold no fd and stay within the object quota. The
//! real binary under a lowered `RLIMIT_NOFILE` (prlimit), over real
//! sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use virtio_dmabuf_protocol::Status;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-dmabuf");

/// Low enough that two guests at the default fd quota (4096 objects) do
/// not fit, high enough for the fixed cost of two guests.
const LIMIT: u64 = 2048;

/// Above the largest object that is an extent of a slab: a memfd of its
/// own.
const LARGE: u64 = 2 << 20;

fn daemon(limit: u64, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={limit}:{limit}"))
        .arg(BIN)
        .arg("--socket-path")
        .arg(socket)
        .args(["--socket-count", "2", "--shm-size", "0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sockets(base: &Path) -> [PathBuf; 2] {
    [0, 1].map(|i| PathBuf::from(format!("{}{i}", base.display())))
}

fn stop(mut child: Child) -> Output {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill only sends SIGTERM to the child this test spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_for("the daemon to exit", || {
        child.try_wait().expect("try_wait").is_some()
    });
    child.wait_with_output().expect("the daemon's output")
}

#[test]
fn a_greedy_guest_gets_enospc_and_the_other_keeps_creating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("dmabuf.sock");
    let child = daemon(LIMIT, &base, &[])
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit and the daemon");
    let [first, second] = sockets(&base);
    wait_for("both sockets", || first.exists() && second.exists());
    let options = VmmOptions {
        shmem: false,
        ..VmmOptions::default()
    };
    let greedy = LoopbackVmm::connect(&first, options.clone()).expect("guest 0");
    let other = LoopbackVmm::connect(&second, options).expect("guest 1");

    let info = greedy
        .driver()
        .get_info()
        .expect("transport")
        .expect("GET_INFO");
    assert_eq!(
        info.max_objects, 4096,
        "the object quota needs no open files and is not lowered"
    );
    let mut held = 0;
    let refused = loop {
        match greedy.driver().create(LARGE, 0).expect("transport") {
            Ok(_) => held += 1,
            Err(status) => break status,
        }
        assert!(held < 4096, "CREATE past the default fd quota");
    };
    assert_eq!(
        refused,
        Status::NoSpc,
        "the fd quota, not the fd table, ends it"
    );
    assert!(held > 0, "the lowered fd quota still holds some");

    for _ in 0..8 {
        other
            .driver()
            .create(LARGE, 0)
            .expect("transport")
            .expect("the other guest's CREATE while guest 0 sits at its fd quota");
    }
    for _ in 0..8 {
        greedy
            .driver()
            .create(4096, 0)
            .expect("transport")
            .expect("small objects hold no fd: guest 0 still creates them");
    }
    greedy.disconnect();
    other.disconnect();
    let out = stop(child);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("open file limit: {LIMIT} (hard {LIMIT})")),
        "{log}"
    );
    assert!(
        log.contains(&format!("--max-fd-objects is {held}")),
        "the lowered quota is logged: {log}"
    );
}

#[test]
fn a_quota_the_limit_cannot_hold_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("dmabuf.sock");
    let out = daemon(LIMIT, &base, &["--max-fd-objects", "4096"])
        .output()
        .expect("prlimit and the daemon");
    assert!(!out.status.success(), "the daemon must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    for words in [
        "open file limit is 2048",
        "--max-fd-objects",
        "--socket-count",
        "LimitNOFILE=",
    ] {
        assert!(err.contains(words), "the message names {words:?}: {err}");
    }
    let [first, second] = sockets(&base);
    assert!(!first.exists() && !second.exists(), "nothing was bound");
}
