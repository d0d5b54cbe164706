// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon tests' side of the loopback VMM: an in-process daemon on a
//! fresh socket, the features it must offer, and bounded waits.
//!
//! Everything waits with bounded polls; nothing sleeps to decide a result.
//! The benchmark includes this file too (`#[path]`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dmabuf_guest_tests::driver::{DriverError, Outcome, Ticket};
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_device_dmabuf::daemon::{self, Config, DaemonHandle};
use virtio_dmabuf_protocol::{
    attach_flags, Direction, Event, Info, MapReply, ObjectReply, Reply, Request, Response,
    CONTROLQ, EVENT_SIZE,
};

/// How long any wait in these tests may take before it fails the test.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Polls `f` until it returns `Some`, at most [`TIMEOUT`].
pub fn poll_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ends the test process if it is still armed after `limit`: a regression
/// that deadlocks the daemon (a worker that never returns makes dropping
/// it wait forever) fails the run instead of hanging it.
pub struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Watchdog {
    pub fn arm(what: &'static str, limit: Duration) -> Watchdog {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = Arc::clone(&done);
        std::thread::spawn(move || {
            let (lock, cv) = &*d;
            let guard = lock.lock().expect("watchdog");
            let (guard, _) = cv
                .wait_timeout_while(guard, limit, |done| !*done)
                .expect("watchdog");
            if !*guard {
                // Not `eprintln!`: the test harness captures that.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "watchdog: {what} still running after {limit:?}; exiting"
                );
                std::process::exit(101);
            }
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        cv.notify_all();
    }
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("proc").count()
}

/// Reads `len` bytes at `offset` of an fd (a memfd or a mapping of one).
pub fn read_fd(file: &File, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, offset).expect("pread");
    out
}

/// A daemon on a fresh socket in a temporary directory.
pub struct TestDaemon {
    pub handle: Option<DaemonHandle>,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    /// A daemon with a 1 MiB window, after `tweak` had its say.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path().join("dmabuf.sock"));
        config.shm_size = 1 << 20;
        tweak(&mut config);
        let handle = daemon::start(config).expect("daemon starts");
        TestDaemon {
            handle: Some(handle),
            dir,
        }
    }

    pub fn handle(&self) -> &DaemonHandle {
        self.handle.as_ref().expect("running")
    }

    pub fn socket(&self, guest: usize) -> PathBuf {
        self.handle().socket_paths()[guest].clone()
    }

    /// Objects the model has, all guests.
    pub fn objects(&self) -> usize {
        self.handle().state().lock().list().len()
    }

    /// A VM on guest socket `guest`.
    pub fn vm(&self, guest: usize, options: VmmOptions) -> LoopbackVmm {
        LoopbackVmm::connect(self.socket(guest), options).expect("the VM connects")
    }

    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

/// A daemon with two request queues and a VM connected with all of them.
pub fn two_queue_daemon() -> (TestDaemon, LoopbackVmm) {
    let d = TestDaemon::start(|c| c.request_queues = 2);
    let vm = d.vm(0, VmmOptions::default());
    (d, vm)
}

/// Every vhost-user protocol feature the device offers.
pub fn device_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::SHARED_OBJECT
        | VhostUserProtocolFeatures::SHMEM
}

/// The device's answer to a driver call that must go through.
pub fn ok<T>(what: &str, r: Result<Outcome<T>, DriverError>) -> T {
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(status)) => panic!("{what}: {status:?}"),
        Err(e) => panic!("{what}: transport: {e}"),
    }
}

/// The device's status for a driver call (the transport must work).
pub fn outcome<T>(what: &str, r: Result<Outcome<T>, DriverError>) -> Outcome<T> {
    r.unwrap_or_else(|e| panic!("{what}: transport: {e}"))
}

/// A `LOCK` that waits (no TRY, no SLOW).
pub fn lock_request(ctx: u64, object: u64) -> Request {
    Request::Lock {
        ctx,
        object,
        try_lock: false,
        slow: false,
    }
}

/// An `OPEN` of `uuid` (BY_UUID).
pub fn open_by_uuid(uuid: [u8; 16]) -> Request {
    Request::Open {
        uuid: Some(uuid),
        name: Vec::new(),
    }
}

/// The guest's requests as the daemon tests write them: every call must
/// get through the transport (a transport failure fails the test), and
/// the device's answer is what the test looks at.
pub trait Guest {
    fn vmm(&self) -> &LoopbackVmm;

    /// Sends `request` on `queue` and waits for the response.
    fn call(&self, queue: u16, request: &Request) -> Response {
        self.vmm()
            .driver()
            .call_on(queue, request)
            .unwrap_or_else(|e| panic!("{:?} on queue {queue}: {e}", request.opcode()))
    }

    /// Makes `request` available on `queue`.
    fn send(&self, queue: u16, request: &Request) -> Ticket {
        self.vmm()
            .driver()
            .submit(queue, request)
            .unwrap_or_else(|e| panic!("{:?} on queue {queue}: {e}", request.opcode()))
    }

    /// The response of a sent request.
    fn wait(&self, ticket: Ticket) -> Response {
        self.vmm().driver().complete(ticket).expect("the response")
    }

    /// The response, if the chain is back already.
    fn try_wait(&self, ticket: &Ticket) -> Option<Response> {
        self.vmm()
            .driver()
            .try_complete(ticket)
            .expect("a decodable response")
    }

    /// Waits until the device took every chain made available on `queue`.
    fn wait_taken(&self, queue: u16) {
        assert!(
            self.vmm()
                .driver()
                .wait_taken(queue, TIMEOUT)
                .expect("the ring"),
            "timed out waiting for queue {queue} to be drained"
        );
    }

    fn info(&self) -> Info {
        ok("GET_INFO", self.vmm().driver().get_info())
    }

    /// CREATE of a host-placed static object of `size` bytes.
    fn create(&self, size: u64) -> ObjectReply {
        ok("CREATE", self.vmm().driver().create(size, 0))
    }

    fn acquire(&self) -> u64 {
        ok("ACQUIRE_INIT", self.vmm().driver().acquire_init()).0
    }

    fn transfer_to(&self, object: u64, offset: u64, data: &[u8]) -> Response {
        self.call(
            CONTROLQ,
            &Request::TransferToHost {
                object,
                offset,
                data: data.to_vec(),
            },
        )
    }

    fn transfer_from(&self, object: u64, offset: u64, len: u64) -> Vec<u8> {
        ok(
            "TRANSFER_FROM_HOST",
            self.vmm().driver().transfer_from_host(object, offset, len),
        )
    }

    fn release(&self, object: u64) -> Response {
        self.call(CONTROLQ, &Request::Release { object })
    }

    fn unlock(&self, ctx: u64, object: u64) -> Response {
        self.call(CONTROLQ, &Request::Unlock { ctx, object })
    }

    /// A LOCK with the TRY flag.
    fn try_lock(&self, ctx: u64, object: u64) -> Response {
        self.call(
            CONTROLQ,
            &Request::Lock {
                ctx,
                object,
                try_lock: true,
                slow: false,
            },
        )
    }

    /// A page-sized object locked by one of two fresh contexts: returns
    /// (object, holder, other).
    fn lock_held(&self) -> (u64, u64, u64) {
        let obj = self.create(4096).object;
        let (a, b) = (self.acquire(), self.acquire());
        assert_eq!(self.call(CONTROLQ, &lock_request(a, obj)), Ok(Reply::Empty));
        (obj, a, b)
    }

    /// ATTACH of a static importer; returns the attachment.
    fn attach(&self, object: u64, peer2peer: bool) -> u64 {
        let flags = if peer2peer {
            attach_flags::PEER2PEER
        } else {
            0
        };
        ok("ATTACH", self.vmm().driver().attach(object, flags))
    }

    /// MAP with no fence context.
    fn map(&self, attachment: u64, dir: Direction, max_entries: u32) -> MapReply {
        ok(
            "MAP",
            self.vmm().driver().map(attachment, dir, max_entries, 0),
        )
    }

    /// UNMAP with no fence context.
    fn unmap(&self, mapping: u64) -> Response {
        self.call(CONTROLQ, &Request::Unmap { mapping, ctx: 0 })
    }

    fn map_shm(&self, object: u64, writable: bool) -> Response {
        self.call(CONTROLQ, &Request::MapShm { object, writable })
    }

    fn export_uuid(&self, object: u64) -> Response {
        self.call(CONTROLQ, &Request::ExportUuid { object })
    }

    /// Posts one eventq buffer of `len` bytes.
    fn post_event_buffer(&self, len: u32) {
        self.vmm()
            .driver()
            .post_event_buffers(1, len)
            .expect("an eventq buffer");
    }

    /// Waits for the next event.
    fn wait_event(&self) -> Event {
        let record = self
            .vmm()
            .driver()
            .next_event(TIMEOUT)
            .expect("the eventq")
            .expect("an event in time");
        assert_eq!(record.used_len as usize, EVENT_SIZE);
        record.event.expect("a known event")
    }

    /// The UUID EXPORT_UUID publishes `object` under.
    fn exported_uuid(&self, object: u64) -> [u8; 16] {
        ok("EXPORT_UUID", self.vmm().driver().export_uuid(object))
    }
}

impl Guest for LoopbackVmm {
    fn vmm(&self) -> &LoopbackVmm {
        self
    }
}

/// A memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// The vhost-user message naming `uuid`.
pub fn shared_msg(uuid: [u8; 16]) -> vhost::vhost_user::message::VhostUserSharedMsg {
    vhost::vhost_user::message::VhostUserSharedMsg {
        uuid: uuid::Uuid::from_bytes(uuid),
    }
}

/// `(request, flags)` of every back-end request the VM received so far.
pub fn channel_headers(vm: &LoopbackVmm) -> Vec<(u32, u32)> {
    vm.frontend_state()
        .received()
        .iter()
        .map(|r| (r.request, r.flags))
        .collect()
}

/// Waits until the VM's back-end channel received a `request` naming
/// `uuid` (any UUID with `None`), handled or not.
pub fn wait_for_request(vm: &LoopbackVmm, what: &str, request: u32, uuid: Option<[u8; 16]>) {
    poll_until(what, || {
        vm.frontend_state()
            .received()
            .iter()
            .any(|r| {
                r.request == request
                    && uuid.is_none_or(|u| r.uuid == Some(uuid::Uuid::from_bytes(u)))
            })
            .then_some(())
    });
}

/// Waits until the VM's back-end channel answered a `request` naming
/// `uuid`.
pub fn wait_for_answer(vm: &LoopbackVmm, what: &str, request: u32, uuid: [u8; 16]) {
    poll_until(what, || {
        vm.frontend_state()
            .log()
            .iter()
            .any(|m| m.request == request && m.uuid == Some(uuid::Uuid::from_bytes(uuid)))
            .then_some(())
    });
}
