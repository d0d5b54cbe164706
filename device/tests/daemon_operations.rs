// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The binary as an operator runs it: sockets handed over (`--socket-fd`,
//! systemd socket activation's `LISTEN_FDS`), readiness over
//! `NOTIFY_SOCKET`, debug logs, and refusals that say what to change. All
//! over real sockets, with the real binary.

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::daemon::*;
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use virtio_dmabuf_protocol::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-dmabuf");

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill only sends a signal to the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    poll_until("the daemon to exit", || child.try_wait().expect("try_wait"))
}

/// Everything the child wrote to stderr (after it exited).
fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut text).expect("stderr");
    }
    text
}

/// `command` with `listener` as fd 3 of the child (not close-on-exec
/// there), as systemd and `--socket-fd 3` callers hand it over.
fn with_fd3(command: &mut Command, listener: &UnixListener) {
    let fd: RawFd = listener.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2 and fcntl, which are async-signal-safe; it touches no
    // memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Connects a front-end and asks GET_INFO: the socket is served.
fn served(socket: &Path) {
    let vm = LoopbackVmm::connect(socket, VmmOptions::default()).expect("connect");
    assert_eq!(vm.info().version, 1);
}

#[test]
fn socket_fd_serves_an_inherited_listening_socket_and_leaves_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let mut command = Command::new(BIN);
    command
        .args(["--socket-fd", "3"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    with_fd3(&mut command, &listener);
    let mut child = command.spawn().expect("spawn");
    served(&socket);
    served(&socket);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    assert!(
        log.contains("guest 0: listening on") && log.contains("(handed over as fd 3)"),
        "{log}"
    );
    assert!(
        socket.exists(),
        "a handed-over socket's file is its owner's"
    );
}

#[test]
fn socket_fd_that_is_not_a_listening_socket_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["--socket-fd", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--socket-fd: file descriptor 0 is not a socket"),
        "{err}"
    );
}

/// `sh` sets `LISTEN_PID` to its own pid and `exec`s the daemon, which so
/// keeps that pid: what systemd's service manager does, fd 3 included.
fn socket_activated(listener: &UnixListener, fds: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS={fds} LISTEN_FDNAMES=vm exec \"$0\" \"$@\""
        ))
        .arg(BIN)
        .args(args)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped());
    with_fd3(&mut command, listener);
    command
}

#[test]
fn a_socket_from_systemd_serves_the_guest_whose_path_it_is_bound_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let path = socket.to_str().expect("utf-8");
    let mut child = socket_activated(&listener, "1", &["--socket-path", path])
        .spawn()
        .expect("spawn");
    served(&socket);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    assert!(
        log.contains("socket \"vm\" handed over by systemd"),
        "{log}"
    );
    assert!(log.contains("(handed over as fd 3)"), "{log}");
    assert!(socket.exists(), "systemd's socket stays");
}

#[test]
fn a_socket_from_systemd_bound_elsewhere_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = UnixListener::bind(dir.path().join("other.sock")).expect("bind");
    let wanted = dir.path().join("vm.sock");
    let mut child = socket_activated(
        &listener,
        "1",
        &["--socket-path", wanted.to_str().expect("utf-8")],
    )
    .spawn()
    .expect("spawn");
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(1));
    let log = stderr_of(&mut child);
    assert!(
        log.contains("other.sock") && log.contains("ListenStream="),
        "{log}"
    );
    assert!(!wanted.exists(), "nothing was bound");
}

#[test]
fn readiness_is_sent_once_the_sockets_listen_and_stopping_at_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify");
    let manager = UnixDatagram::bind(&notify).expect("bind");
    manager
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let socket = dir.path().join("vm.sock");
    let control = dir.path().join("vm.ctl");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control-socket")
        .arg(&control)
        .env("NOTIFY_SOCKET", &notify)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("READY=1 within the timeout");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains("STATUS=serving 1 guest socket(s)"),
        "{ready:?}"
    );
    // Ready means listening: both sockets take a connection at once.
    UnixStream::connect(&socket).expect("the guest socket listens");
    UnixStream::connect(&control).expect("the control socket listens");
    signal(&child, libc::SIGTERM);
    let n = manager.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn debug_logs_show_messages_requests_and_a_summary_at_disconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    poll_until("the socket", || socket.exists().then_some(()));
    {
        let vm = LoopbackVmm::connect(&socket, VmmOptions::default()).expect("connect");
        vm.info();
        let o = vm.create(4096);
        assert_eq!(
            vm.call(
                0,
                &Request::Release {
                    object: o.object + 1000
                }
            ),
            Err(Status::NoEnt)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    for line in [
        "vhost-user front-end: SET_OWNER",
        "vhost-user front-end: SET_MEM_TABLE",
        "vhost-user reply to GET_FEATURES",
        ": GET_INFO tag",
        ": CREATE tag",
        ": RELEASE tag",
        "ENOENT",
        "front-end disconnected after",
        " requests",
        "vhost-user messages",
        "CREATE OK 1",
        "RELEASE ENOENT 1",
        "GET_INFO OK 1",
    ] {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
}

#[test]
fn info_logs_have_the_summary_but_no_line_per_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    poll_until("the socket", || socket.exists().then_some(()));
    {
        let vm = LoopbackVmm::connect(&socket, VmmOptions::default()).expect("connect");
        vm.info();
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    assert!(log.contains("front-end disconnected after"), "{log}");
    assert!(log.contains(" requests, "), "{log}");
    assert!(!log.contains("GET_INFO tag"), "{log}");
    assert!(!log.contains("SET_MEM_TABLE"), "{log}");
}

#[test]
fn a_quota_refusal_names_the_option_to_raise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--max-objects", "2", "--max-bytes", "64K"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    poll_until("the socket", || socket.exists().then_some(()));
    {
        let vm = LoopbackVmm::connect(&socket, VmmOptions::default()).expect("connect");
        let create = |size| Request::Create {
            size,
            dynamic: false,
            cache_mapping: false,
            guest_pages: None,
        };
        vm.create(32 << 10);
        assert_eq!(vm.call(0, &create(48 << 10)), Err(Status::NoSpc), "bytes");
        vm.create(4096);
        assert_eq!(vm.call(0, &create(4096)), Err(Status::NoSpc), "objects");
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    assert!(
        log.contains("CREATE refused with ENOSPC")
            && log.contains("would pass --max-bytes 65536")
            && log.contains("raise the limit"),
        "{log}"
    );
    assert_eq!(
        log.matches("refused with ENOSPC").count(),
        1,
        "said once per connection: {log}"
    );
    assert!(log.contains("2 refused by a quota"), "{log}");
}

#[test]
fn start_up_refusals_say_what_to_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let five = dir.path().join("five-bytes");
    std::fs::write(&five, b"hello").expect("file");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--export", &format!("cam={}", five.display())]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--export cam:") && err.contains("size 5 is not a page multiple (4096)"),
        "{err}"
    );
    let (code, err) = run(&["--export", "cam=/nonexistent/frame"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot open /nonexistent/frame"), "{err}");
    let (code, err) = run(&["--shm-size", "5"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--shm-size 5 is not a page multiple (4096): use 4096"),
        "{err}"
    );
    if !Path::new("/dev/udmabuf").exists() {
        let (code, err) = run(&["--provider", "udmabuf"]);
        assert_eq!(code, Some(1));
        assert!(
            err.contains("/dev/udmabuf is missing")
                && err.contains("modprobe udmabuf")
                && err.contains("--provider memfd"),
            "{err}"
        );
    }
    assert!(!socket.exists());
}
