// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host control interface (contract sections 10 and 11) end to end:
//! the real control plane on a socket, driven through the `ctl` client's
//! library code, with guests played by calls into the shared exporter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use serde_json::Value;
use vhost_device_dmabuf::control::{
    execute, request, run_ctl, spawn_control_plane, ControlHandle, CtlArgs, CtlError, Request,
    MAX_CLIENTS, MAX_LINE,
};
use vhost_device_dmabuf::exporter::{
    page_size, Exporter, ExporterConfig, GuestCaps, NoFrontend, Origin,
};
use vhost_device_dmabuf::provider::MemfdProvider;
use vhost_device_dmabuf::state::DeviceState;
use virtio_dmabuf_protocol::{EventType, Reply, Request as GuestRequest, Response, Status};

/// `vhost-device-dmabuf ctl ...` as the daemon will parse it.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    ctl: CtlArgs,
}

/// A device with two connected guests, its timer thread and its control
/// plane on a socket in a temporary directory.
struct Plane {
    state: Arc<DeviceState>,
    control: Option<ControlHandle>,
    timer: Option<JoinHandle<()>>,
    path: PathBuf,
    next_token: AtomicU64,
    _dir: tempfile::TempDir,
}

impl Plane {
    fn new() -> Plane {
        let config = ExporterConfig {
            host_exports: true,
            ..ExporterConfig::default()
        };
        let mut ex = Exporter::new(config, Box::new(MemfdProvider::new(64 << 20)), 2);
        for guest in 0..2 {
            ex.connect(guest, GuestCaps::default(), Box::new(NoFrontend));
        }
        let state = DeviceState::new(ex).unwrap();
        let timer = state.spawn_timer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let control = spawn_control_plane(&path, state.clone()).unwrap();
        Plane {
            state,
            control: Some(control),
            timer: Some(timer),
            path,
            next_token: AtomicU64::new(1),
            _dir: dir,
        }
    }

    /// Runs `ctl --control-socket PATH ARGS...` and returns its stdout.
    fn ctl(&self, args: &[&str]) -> Result<String, CtlError> {
        let path = self.path.to_str().unwrap();
        let argv = ["ctl", "--control-socket", path]
            .into_iter()
            .chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).unwrap();
        execute(&cli.ctl)
    }

    /// `ctl ARGS... --json`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.ctl(&args).unwrap();
        assert_eq!(out.lines().count(), 1, "one JSON object: {out}");
        serde_json::from_str(&out).unwrap()
    }

    fn objects(&self) -> Vec<Value> {
        let list = self.json(&["list"]);
        list["objects"].as_array().unwrap().clone()
    }

    fn object(&self, uuid: &str) -> Value {
        self.objects()
            .into_iter()
            .find(|o| o["uuid"] == uuid)
            .unwrap_or_else(|| panic!("{uuid} not listed"))
    }

    /// `ctl export NAME --fd-from PATH ARGS...`; returns the UUID.
    fn export(&self, name: &str, buffer: &Path, args: &[&str]) -> String {
        let fd_from = buffer.to_str().unwrap();
        let mut argv = vec!["export", name, "--fd-from", fd_from];
        argv.extend_from_slice(args);
        let out = self.json(&argv);
        assert_eq!(out["ok"], true, "{out}");
        out["uuid"].as_str().unwrap().to_owned()
    }

    /// One guest request, as a vring worker would submit it.
    fn submit(&self, guest: usize, request: GuestRequest) -> Option<Response> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.state.lock();
        let origin = Origin { queue: 0, token };
        let response = ex.submit(guest, origin, token, request, Instant::now());
        self.state.changed(&ex);
        response
    }

    fn ok(&self, guest: usize, request: GuestRequest) -> Reply {
        let r = self.submit(guest, request.clone());
        r.unwrap_or_else(|| panic!("{request:?} parked"))
            .unwrap_or_else(|s| panic!("{request:?} failed: {s}"))
    }

    fn err(&self, guest: usize, request: GuestRequest) -> Status {
        match self.submit(guest, request.clone()) {
            Some(Err(s)) => s,
            other => panic!("{request:?}: {other:?}"),
        }
    }

    fn open(&self, guest: usize, name: &str) -> Response {
        let open = GuestRequest::Open {
            uuid: None,
            name: name.as_bytes().to_vec(),
        };
        self.submit(guest, open).expect("OPEN never parks")
    }

    fn open_ok(&self, guest: usize, name: &str) -> u64 {
        match self.open(guest, name) {
            Ok(Reply::Object(o)) => o.object,
            r => panic!("OPEN {name}: {r:?}"),
        }
    }

    fn attach_dynamic(&self, guest: usize, object: u64) -> u64 {
        let attach = GuestRequest::Attach {
            object,
            dynamic_importer: true,
            peer2peer: false,
        };
        match self.ok(guest, attach) {
            Reply::Attachment(a) => a,
            r => panic!("{r:?}"),
        }
    }

    /// Guest 1 opens `cam0` and attaches to it as a dynamic importer;
    /// returns (handle, attachment).
    fn open_dynamic(&self) -> (u64, u64) {
        let h = self.open_ok(1, "cam0");
        let a = self.attach_dynamic(1, h);
        (h, a)
    }

    /// A new acquire context of `guest` that holds the lock of `object`.
    fn lock(&self, guest: usize, object: u64) -> u64 {
        let Reply::Acquire { ctx, .. } = self.ok(guest, GuestRequest::AcquireInit) else {
            panic!("ACQUIRE_INIT");
        };
        let lock = GuestRequest::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        };
        self.ok(guest, lock);
        ctx
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            control.stop();
        }
        self.state.stop_timer();
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

/// A memfd standing in for a host dma-buf, reachable by path.
struct HostBuffer {
    fd: OwnedFd,
    name: String,
}

static BUFFERS: AtomicU64 = AtomicU64::new(0);

impl HostBuffer {
    fn new(pages: u64) -> HostBuffer {
        let n = BUFFERS.fetch_add(1, Ordering::Relaxed);
        let name = format!("ctl-test-{}-{n}", std::process::id());
        let fd = memfd_create(&name, MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, pages * page_size()).unwrap();
        HostBuffer { fd, name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Open fds of this process on this memfd. Tests run in parallel
    /// threads, so counting all of `/proc/self/fd` would race; the memfd's
    /// unique name tells its own fds apart.
    fn open_fds(&self) -> usize {
        let target = format!("/memfd:{} (deleted)", self.name);
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| t.to_string_lossy() == target)
            .count()
    }
}

/// A plane exporting a host buffer of `pages` pages as `cam0` with `ctl
/// export` arguments `args`; returns the plane, the buffer and the UUID.
fn plane_exporting(pages: u64, args: &[&str]) -> (Plane, HostBuffer, String) {
    let p = Plane::new();
    let buf = HostBuffer::new(pages);
    let uuid = p.export("cam0", &buf.path(), args);
    (p, buf, uuid)
}

/// Polls `done` every 5 ms until it holds, failing with `what` after 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn refused(result: Result<String, CtlError>) -> String {
    match result {
        Err(CtlError::Refused(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ---- list, OPEN by name, stats ----

#[test]
fn export_with_guests_1_is_listed_with_the_section_11_fields() {
    let (p, _buf, uuid) = plane_exporting(4, &["--guests", "1"]);
    let o = p.object(&uuid);
    for key in [
        "uuid",
        "size",
        "provider",
        "exporter",
        "placement",
        "generation",
        "export",
        "guests",
        "attachments",
        "lock_holder",
        "fences_pending",
        "shm_offset",
    ] {
        assert!(o.get(key).is_some(), "{key} missing from {o}");
    }
    assert_eq!(o["size"], 4 * page_size());
    assert_eq!(o["exporter"], "static");
    assert_eq!(o["placement"], "host");
    assert_eq!(o["generation"], 0);
    assert_eq!(o["export"], "cam0");
    assert_eq!(o["guests"], serde_json::json!([]));
    assert_eq!(o["attachments"], serde_json::json!([]));
    assert_eq!(o["lock_holder"], Value::Null);
    assert_eq!(o["fences_pending"], 0);
    assert_eq!(o["shm_offset"], Value::Null);
}

#[test]
fn guest_1_opens_the_export_by_name_and_guest_0_gets_enoent() {
    let (p, _buf, uuid) = plane_exporting(1, &["--guests", "1"]);
    let h = p.open_ok(1, "cam0");
    assert_ne!(h, 0);
    assert_eq!(p.open(0, "cam0"), Err(Status::NoEnt));
    let o = p.object(&uuid);
    assert_eq!(o["guests"], serde_json::json!([1]));
}

#[test]
fn stats_json_counts_guest_requests_by_opcode_and_status() {
    let (p, _buf, _) = plane_exporting(1, &["--guests", "1"]);
    p.open_ok(1, "cam0");
    assert_eq!(p.open(0, "cam0"), Err(Status::NoEnt));
    let stats = p.json(&["stats"]);
    assert_eq!(stats["requests"]["OPEN"]["OK"], 1, "{stats}");
    assert_eq!(stats["requests"]["OPEN"]["ENOENT"], 1, "{stats}");
    assert!(stats["syncs"].is_object());
    assert!(stats["recent_syncs"].is_array());
    assert!(
        stats.get("ok").is_none(),
        "stats --json is the stats object"
    );
}

#[test]
fn list_and_stats_print_tables_without_json() {
    let (p, _buf, uuid) = plane_exporting(2, &["--dynamic"]);
    p.open_dynamic();
    let list = p.ctl(&["list"]).unwrap();
    let line = list
        .lines()
        .find(|l| l.contains(&uuid))
        .expect("object line");
    for part in ["cam0", "dynamic", "host", "g1 dynamic pins=0"] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(list.ends_with(&format!("1 objects, {} bytes\n", 2 * page_size())));
    let stats = p.ctl(&["stats"]).unwrap();
    assert!(stats.contains("OPEN") && stats.contains("OK=1"), "{stats}");
}

// ---- export ----

#[test]
fn export_name_taken_or_unknown_guest_is_refused() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let path = buf.path();
    let fd_from = path.to_str().unwrap();
    p.export("cam0", &path, &[]);
    let again = refused(p.ctl(&["export", "cam0", "--fd-from", fd_from]));
    assert!(again.contains("exists already"), "{again}");
    let guest = refused(p.ctl(&["export", "cam1", "--fd-from", fd_from, "--guests", "5"]));
    assert!(guest.contains("guest 5"), "{guest}");
}

#[test]
fn export_without_an_fd_or_with_a_read_only_fd_is_refused() {
    let p = Plane::new();
    let export = Request::Export {
        name: "cam0".into(),
        dynamic: false,
        read_only: false,
        guests: None,
    };
    let r = request(&p.path, &export, None).unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("exactly one fd"),
        "{r}"
    );

    let buf = HostBuffer::new(1);
    let read_only = std::fs::File::open(buf.path()).unwrap();
    let r = request(&p.path, &export, Some(read_only.as_fd())).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("read-only"), "{r}");

    let fd_from = buf.path();
    let uuid = p.export("cam0", &fd_from, &["--read-only"]);
    assert_eq!(p.object(&uuid)["export"], "cam0");
}

#[test]
fn an_fd_sent_with_another_request_is_refused_and_closed() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let r = request(&p.path, &Request::List {}, Some(buf.fd.as_fd())).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("takes no fd"), "{r}");
    assert_eq!(buf.open_fds(), 1);
}

#[test]
fn the_exported_fd_is_held_until_revoke_and_release() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    assert_eq!(buf.open_fds(), 1, "the test's own");
    p.export("cam0", &buf.path(), &[]);
    assert_eq!(buf.open_fds(), 2, "the daemon received it");
    let h = p.open_ok(1, "cam0");
    p.ctl(&["revoke", "cam0"]).unwrap();
    p.ok(1, GuestRequest::Release { object: h });
    assert_eq!(buf.open_fds(), 1, "the daemon closed it");
    assert!(p.objects().is_empty());
}

// ---- revoke ----

#[test]
fn revoke_makes_the_guest_handle_fail_and_sends_revoked() {
    let (p, _buf, uuid) = plane_exporting(1, &["--guests", "1"]);
    let h = p.open_ok(1, "cam0");
    let out = p.json(&["revoke", "cam0"]);
    assert_eq!(out["ok"], true, "{out}");
    let attach = GuestRequest::Attach {
        object: h,
        dynamic_importer: false,
        peer2peer: false,
    };
    assert_eq!(p.err(1, attach), Status::NoEnt);
    let event = p.state.lock().pop_event(1).expect("an event");
    assert_eq!((event.kind, event.object), (EventType::Revoked, h));
    assert_eq!(p.open(1, "cam0"), Err(Status::NoEnt), "the name is gone");
    // Still listed while guest 1 holds its handle.
    assert_eq!(p.object(&uuid)["guests"], serde_json::json!([1]));
    let again = refused(p.ctl(&["revoke", "cam0"]));
    assert!(again.contains("no export named"), "{again}");
}

// ---- evict ----

#[test]
fn evict_notifies_the_dynamic_importer_and_bumps_the_generation() {
    let (p, _buf, uuid) = plane_exporting(1, &["--dynamic", "--guests", "1"]);
    let (h, a) = p.open_dynamic();
    let out = p.json(&["evict", &uuid]);
    assert_eq!(out["ok"], true, "{out}");
    let event = p.state.lock().pop_event(1).expect("MOVE_NOTIFY");
    assert_eq!(
        (event.kind, event.object, event.attachment, event.data),
        (EventType::MoveNotify, h, a, 1)
    );
    assert_eq!(p.object(&uuid)["generation"], 1);
}

#[test]
fn evict_while_pinned_is_refused_at_once() {
    let (p, _buf, uuid) = plane_exporting(1, &["--dynamic"]);
    let (h, a) = p.open_dynamic();
    let ctx = p.lock(1, h);
    p.ok(1, GuestRequest::Pin { attachment: a, ctx });
    p.ok(1, GuestRequest::Unlock { ctx, object: h });
    let message = refused(p.ctl(&["evict", &uuid]));
    assert!(message.contains("object is pinned"), "{message}");
    assert_eq!(p.object(&uuid)["generation"], 0);
}

#[test]
fn evict_of_a_static_exporter_or_unknown_uuid_is_refused() {
    let (p, _buf, uuid) = plane_exporting(1, &[]);
    let message = refused(p.ctl(&["evict", &uuid]));
    assert!(message.contains("static exporter"), "{message}");
    let unknown = uuid::Uuid::new_v4().to_string();
    let message = refused(p.ctl(&["evict", &unknown]));
    assert!(message.contains("no live object"), "{message}");
}

#[test]
fn evict_while_a_guest_context_holds_the_lock_fails_after_its_timeout() {
    let (p, _buf, uuid) = plane_exporting(1, &["--dynamic"]);
    let (h, _) = p.open_dynamic();
    let ctx = p.lock(1, h);
    let message = refused(p.ctl(&["evict", &uuid, "--timeout-ms", "100"]));
    assert!(message.contains("not free within 100 ms"), "{message}");
    assert_eq!(p.object(&uuid)["generation"], 0);
    p.ok(1, GuestRequest::Unlock { ctx, object: h });
    assert_eq!(p.json(&["evict", &uuid])["ok"], true);
}

#[test]
fn a_waiting_evict_does_not_stop_other_clients_and_ends_when_the_lock_is_free() {
    let (p, _buf, uuid) = plane_exporting(1, &["--dynamic"]);
    let (h, a) = p.open_dynamic();
    let ctx = p.lock(1, h);
    let path = p.path.clone();
    let target: uuid::Uuid = uuid.parse().unwrap();
    let evict = std::thread::spawn(move || {
        let req = Request::Evict {
            uuid: target,
            timeout_ms: 60_000,
        };
        request(&path, &req, None)
    });
    // The eviction is parked once it has a deadline.
    wait_until("evict never parked", || {
        p.state.lock().next_deadline().is_some()
    });
    // The loop still serves others while it waits.
    let o = p.object(&uuid);
    assert_eq!(o["lock_holder"]["guest"], 1, "{o}");
    p.ok(1, GuestRequest::Unlock { ctx, object: h });
    let answer = evict.join().unwrap().unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let event = p.state.lock().pop_event(1).expect("MOVE_NOTIFY");
    assert_eq!((event.kind, event.attachment), (EventType::MoveNotify, a));
    assert_eq!(p.object(&uuid)["generation"], 1);
}

// ---- the connection ----

/// A raw client: write lines, read answers.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }
}

#[test]
fn a_malformed_line_gets_an_error_and_the_connection_stays() {
    let p = Plane::new();
    let mut c = Raw::connect(&p.path);
    c.send(b"this is not json\n");
    let r = c.answer();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");
    c.send(b"{\"cmd\":\"format\"}\n");
    assert_eq!(c.answer()["ok"], false);
    c.send(b"{\"cmd\":\"list\",\"verbose\":true}\n");
    assert_eq!(c.answer()["ok"], false);
    c.send(b"{\"cmd\":\"list\"}\n");
    let r = c.answer();
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["objects"].is_array());
}

#[test]
fn an_overlong_line_gets_one_error_and_the_connection_stays() {
    let p = Plane::new();
    let mut c = Raw::connect(&p.path);
    let mut long = vec![b'x'; MAX_LINE + 1000];
    long.push(b'\n');
    c.send(&long);
    let r = c.answer();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    c.send(b"{\"cmd\":\"stats\"}\n");
    assert_eq!(c.answer()["ok"], true);
}

#[test]
fn pipelined_requests_are_answered_in_order_and_blank_lines_ignored() {
    let p = Plane::new();
    let mut c = Raw::connect(&p.path);
    c.send(b"{\"cmd\":\"list\"}\n\n{\"cmd\":\"revoke\",\"name\":\"none\"}\n{\"cmd\":\"stats\"}\n");
    let first = c.answer();
    assert!(first["objects"].is_array(), "{first}");
    assert_eq!(c.answer()["ok"], false);
    assert!(c.answer()["requests"].is_object());
}

#[test]
fn a_last_line_without_newline_is_answered_after_shutdown() {
    let p = Plane::new();
    let mut c = Raw::connect(&p.path);
    c.send(b"{\"cmd\":\"list\"}");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.answer()["ok"], true);
    let mut rest = String::new();
    c.reader.read_line(&mut rest).unwrap();
    assert_eq!(rest, "", "then the daemon closes");
}

#[test]
fn clients_beyond_the_limit_are_told_and_disconnected() {
    let p = Plane::new();
    let mut clients: Vec<Raw> = (0..MAX_CLIENTS).map(|_| Raw::connect(&p.path)).collect();
    for c in &mut clients {
        c.send(b"{\"cmd\":\"stats\"}\n");
        assert_eq!(c.answer()["ok"], true);
    }
    let mut extra = Raw::connect(&p.path);
    let r = extra.answer();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("too many"), "{r}");
    clients.pop();
    // The daemon notices the hang-up; then there is room again.
    let start = Instant::now();
    loop {
        let mut c = Raw::connect(&p.path);
        c.send(b"{\"cmd\":\"stats\"}\n");
        if c.answer()["ok"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no room again");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stop_removes_the_socket() {
    let mut p = Plane::new();
    assert!(p.path.exists());
    p.control.take().unwrap().stop();
    assert!(!p.path.exists());
    assert!(matches!(p.ctl(&["list"]), Err(CtlError::Connect { .. })));
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let p = Plane::new();
    assert!(spawn_control_plane(&p.path, p.state.clone()).is_err());
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let control = spawn_control_plane(&stale, p.state.clone()).unwrap();
    let r = request(&stale, &Request::List {}, None).unwrap();
    assert_eq!(r["ok"], true);
    control.stop();
}

#[test]
fn run_ctl_fails_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.sock");
    let cli =
        Cli::try_parse_from(["ctl", "--control-socket", path.to_str().unwrap(), "list"]).unwrap();
    assert_eq!(run_ctl(cli.ctl), std::process::ExitCode::FAILURE);
}

/// Sends `line` with `fd` attached, as the client does.
fn send_with_fd(stream: &UnixStream, line: &[u8], fd: std::os::fd::BorrowedFd<'_>) {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    let n = sendmsg(
        stream,
        &[std::io::IoSlice::new(line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, line.len());
}

#[test]
fn pipelined_exports_each_take_the_fd_sent_with_their_line() {
    let p = Plane::new();
    let one = HostBuffer::new(1);
    let three = HostBuffer::new(3);
    let export = |name: &str| {
        Request::Export {
            name: name.into(),
            dynamic: false,
            read_only: false,
            guests: None,
        }
        .to_line()
    };
    let mut c = Raw::connect(&p.path);
    send_with_fd(&c.stream, &export("one"), one.fd.as_fd());
    c.send(b"{\"cmd\":\"stats\"}\n");
    send_with_fd(&c.stream, &export("three"), three.fd.as_fd());
    let first = c.answer();
    assert_eq!(first["size"], page_size(), "{first}");
    assert!(c.answer()["requests"].is_object());
    let second = c.answer();
    assert_eq!(second["size"], 3 * page_size(), "{second}");
    assert_eq!((one.open_fds(), three.open_fds()), (2, 2));
}

#[test]
fn a_request_from_a_client_that_hangs_up_at_once_is_still_carried_out() {
    let (p, _buf, _) = plane_exporting(1, &[]);
    let mut c = Raw::connect(&p.path);
    c.send(b"{\"cmd\":\"revoke\",\"name\":\"cam0\"}\n");
    drop(c);
    wait_until("never revoked", || p.objects().is_empty());
}

// ---- bad input (section 11: an error answer, and the connection serves on) ----

#[test]
fn every_kind_of_bad_line_gets_an_error_and_the_connection_keeps_serving() {
    let p = Plane::new();
    let mut c = Raw::connect(&p.path);
    let bad: [&[u8]; 12] = [
        b"\xff\xfe{\"cmd\":\"list\"}\n",
        b"{\"cmd\":\"revoke\",\"name\":\"\xc3\x28\"}\n",
        b"{\"cmd\":\"shutdown\"}\n",
        b"{\"cmd\":42}\n",
        b"{\"cmd\":\"revoke\",\"name\":7}\n",
        b"{\"cmd\":\"evict\",\"uuid\":\"not-a-uuid\"}\n",
        b"{\"cmd\":\"evict\",\"uuid\":\"00000000-0000-0000-0000-000000000001\",\"timeout_ms\":-1}\n",
        b"{\"cmd\":\"evict\",\"uuid\":\"00000000-0000-0000-0000-000000000001\",\"timeout_ms\":1e400}\n",
        b"{\"cmd\":\"evict\",\"uuid\":\"00000000-0000-0000-0000-000000000001\",\"timeout_ms\":184467440737095516160}\n",
        b"{\"cmd\":\"export\",\"name\":\"a\",\"guests\":[-1]}\n",
        b"{\"cmd\":\"export\",\"name\":\"a\",\"dynamic\":\"yes\"}\n",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
    ];
    for line in bad {
        c.send(line);
        let r = c.answer();
        assert_eq!(r["ok"], false, "{:?}: {r}", String::from_utf8_lossy(line));
        assert!(r["error"].is_string(), "{r}");
    }
    // The largest timeout is a number, not an error of the parser; the
    // object does not exist, so it is refused by the model, not a panic.
    c.send(b"{\"cmd\":\"evict\",\"uuid\":\"00000000-0000-0000-0000-000000000001\",\"timeout_ms\":18446744073709551615}\n");
    let r = c.answer();
    assert_eq!(r["ok"], false, "{r}");
    c.send(b"{\"cmd\":\"list\"}\n");
    assert_eq!(c.answer()["ok"], true);
}

#[test]
fn export_names_with_nul_or_longer_than_31_bytes_are_refused_and_the_fd_closed() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let mut c = Raw::connect(&p.path);
    let long32 = "n".repeat(32);
    for name in ["", "ca\0m", long32.as_str(), "é".repeat(16).as_str()] {
        let line = Request::Export {
            name: name.into(),
            dynamic: false,
            read_only: false,
            guests: None,
        }
        .to_line();
        send_with_fd(&c.stream, &line, buf.fd.as_fd());
        let r = c.answer();
        assert_eq!(r["ok"], false, "{name:?}: {r}");
        assert!(r["error"].as_str().unwrap().contains("name"), "{r}");
    }
    let ok31 = "n".repeat(31);
    let line = Request::Export {
        name: ok31.clone(),
        dynamic: false,
        read_only: false,
        guests: Some(vec![usize::MAX]),
    }
    .to_line();
    send_with_fd(&c.stream, &line, buf.fd.as_fd());
    assert_eq!(c.answer()["ok"], false, "a guest index past the last one");
    assert_eq!(buf.open_fds(), 1, "every refused fd was closed");
    assert_eq!(p.export(&ok31, &buf.path(), &[]).len(), 36);
}

#[test]
fn fds_sent_with_a_malformed_blank_or_overlong_line_are_closed() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let mut c = Raw::connect(&p.path);
    send_with_fd(
        &c.stream,
        b"{\"cmd\":\"export\",\"name\":7}\n",
        buf.fd.as_fd(),
    );
    assert_eq!(c.answer()["ok"], false);
    send_with_fd(&c.stream, b"   \n", buf.fd.as_fd());
    // An overlong line whose fd comes with its first bytes.
    let mut long = vec![b' '; MAX_LINE + 4096];
    long.push(b'\n');
    send_with_fd(&c.stream, &long[..1024], buf.fd.as_fd());
    c.send(&long[1024..]);
    let r = c.answer();
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    // ... and one whose fd comes with its last bytes.
    c.send(&long[..MAX_LINE + 10]);
    send_with_fd(&c.stream, &long[MAX_LINE + 10..], buf.fd.as_fd());
    let r = c.answer();
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    c.send(b"{\"cmd\":\"list\"}\n");
    assert_eq!(c.answer()["objects"], serde_json::json!([]));
    assert_eq!(buf.open_fds(), 1, "the daemon kept none of them");
}

#[test]
fn fds_of_a_client_that_hangs_up_mid_line_are_closed() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let c = Raw::connect(&p.path);
    send_with_fd(&c.stream, b"{\"cmd\":\"export\",\"na", buf.fd.as_fd());
    wait_until("the daemon never received the fd", || buf.open_fds() == 2);
    drop(c);
    wait_until("the fd of the unfinished line was kept", || {
        buf.open_fds() == 1
    });
    assert!(p.objects().is_empty());
}

#[test]
fn too_many_fds_on_one_line_are_all_closed_and_the_export_refused() {
    let p = Plane::new();
    let buf = HostBuffer::new(1);
    let c = Raw::connect(&p.path);
    let mut c = c;
    let line = Request::Export {
        name: "many".into(),
        dynamic: false,
        read_only: false,
        guests: None,
    }
    .to_line();
    {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let fds = [buf.fd.as_fd(); 8];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(
            &c.stream,
            &[std::io::IoSlice::new(&line)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .unwrap();
    }
    let r = c.answer();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(buf.open_fds(), 1);
}

// ---- the JSON shapes of section 11, field by field ----

fn assert_type(v: &Value, what: &str, ok: impl Fn(&Value) -> bool) {
    assert!(ok(v), "{what} has the wrong type: {v}");
}

#[test]
fn list_json_fields_have_the_section_11_types() {
    let (p, _buf, uuid) = plane_exporting(2, &["--dynamic", "--guests", "1"]);
    let (h, _a) = p.open_dynamic();
    let _ctx = p.lock(1, h);
    let list = p.json(&["list"]);
    let keys: Vec<&String> = list.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["objects"], "list --json is {{\"objects\": [...]}}");
    let o = p.object(&uuid);
    assert_type(&o["uuid"], "uuid", |v| {
        v.as_str().is_some_and(|s| s.parse::<uuid::Uuid>().is_ok())
    });
    assert_type(&o["size"], "size", Value::is_u64);
    assert_type(&o["provider"], "provider", Value::is_string);
    assert!(["static", "dynamic"].contains(&o["exporter"].as_str().unwrap()));
    assert!(["host", "guest"].contains(&o["placement"].as_str().unwrap()));
    assert_type(&o["generation"], "generation", Value::is_u64);
    assert_type(&o["export"], "export", |v| v.is_string() || v.is_null());
    assert_eq!(o["guests"], serde_json::json!([1]));
    assert_type(&o["fences_pending"], "fences_pending", Value::is_u64);
    assert_type(&o["shm_offset"], "shm_offset", |v| {
        v.is_null() || v.is_u64()
    });
    let holder = &o["lock_holder"];
    assert_eq!(holder["guest"], 1, "{holder}");
    assert_type(&holder["stamp"], "lock_holder.stamp", Value::is_u64);
    assert_eq!(holder.as_object().unwrap().len(), 2, "{holder}");
    let attachments = o["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 1);
    let a = &attachments[0];
    assert_eq!(a["guest"], 1);
    assert!(["static", "dynamic"].contains(&a["importer"].as_str().unwrap()));
    assert_type(&a["pins"], "pins", Value::is_u64);
    assert_type(&a["cached_dir"], "cached_dir", |v| {
        v.is_null() || v.as_u64().is_some_and(|d| d <= 2)
    });
    assert_type(&a["mappings"], "mappings", Value::is_u64);
    let mut fields: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["cached_dir", "guest", "importer", "mappings", "pins"]
    );
}

#[test]
fn stats_json_fields_have_the_section_11_types() {
    let (p, _buf, _) = plane_exporting(1, &["--guests", "1"]);
    p.open_ok(1, "cam0");
    let stats = p.json(&["stats"]);
    let mut keys: Vec<&str> = stats
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["host_fences", "recent_syncs", "requests", "syncs"]);
    // The project's addition (docs/protocol.md, "Host fences").
    let h = &stats["host_fences"];
    assert!(h["source"].is_null() || h["source"].is_string(), "{h}");
    assert!(h["node"].is_null() || h["node"].is_string(), "{h}");
    assert!(h["carries_errors"].is_boolean(), "{h}");
    assert!(
        h["source_timeout_ms"].is_null() || h["source_timeout_ms"].is_u64(),
        "{h}"
    );
    for key in [
        "installed",
        "install_failed",
        "signalled",
        "errors_dropped",
        "expired_at_source",
        "pending",
        "waits",
        "wait_timeouts",
        "watching",
    ] {
        assert!(h[key].is_u64(), "{key}: {h}");
    }
    for (opcode, by_status) in stats["requests"].as_object().unwrap() {
        for (status, n) in by_status.as_object().unwrap() {
            assert!(n.is_u64(), "{opcode}/{status}: {n}");
        }
    }
    for (flags, n) in stats["syncs"].as_object().unwrap() {
        assert!(
            flags.starts_with("START|") || flags.starts_with("END|"),
            "{flags}"
        );
        assert!(n.is_u64(), "{flags}: {n}");
    }
    for s in stats["recent_syncs"].as_array().unwrap() {
        assert!(s["uuid"].is_string() && s["flags"].is_u64(), "{s}");
        assert!(s["kernel"].is_boolean(), "{s}");
        assert!(s["errno"].is_null() || s["errno"].is_i64(), "{s}");
    }
}

#[test]
fn the_control_socket_appears_only_as_mode_0600_and_leaves_no_staging_behind() {
    use std::os::unix::fs::PermissionsExt;
    let p = Plane::new();
    let mode = std::fs::metadata(&p.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let parent = p.path.parent().unwrap();
    let names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["ctl.sock".to_owned()],
        "only the socket is left"
    );
    request(&p.path, &Request::List {}, None).unwrap();
}
