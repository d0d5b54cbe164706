//! A small VMM front-end for the daemon tests: the `vhost` crate's
//! `Frontend` over the daemon's real socket, guest RAM in memfds shared
//! with the daemon, a minimal split-virtqueue driver over it, and the
//! front-end side of the back-end channel.
//!
//! Everything waits with bounded polls; nothing sleeps to decide a result.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_device_dmabuf::daemon::{self, Config, DaemonHandle};
use virtio_dmabuf_protocol::*;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long any wait in these tests may take before it fails the test.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

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

/// A daemon on a fresh socket in a temporary directory.
pub struct TestDaemon {
    pub handle: Option<DaemonHandle>,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
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

/// A memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
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

/// What the test front-end negotiates.
#[derive(Debug, Clone)]
pub struct Options {
    /// Queues the device has (request queues + 1).
    pub queues: usize,
    pub protocol: VhostUserProtocolFeatures,
    pub event_idx: bool,
    /// Who serves the back-end channel, if there is one.
    pub channel: ChannelKind,
    /// Guest RAM regions: (gpa, size).
    pub regions: Vec<(u64, u64)>,
    pub queue_size: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 2,
            protocol: device_protocol_features(),
            event_idx: true,
            channel: ChannelKind::Peer,
            regions: vec![(0, 32 << 20)],
            queue_size: 256,
        }
    }
}

impl Options {
    /// Two request queues and the eventq, for a daemon with
    /// `request_queues = 2`.
    pub fn two_request_queues() -> Options {
        Options {
            queues: 3,
            ..Options::default()
        }
    }

    /// The default options without the protocol feature `feature`.
    pub fn without(feature: VhostUserProtocolFeatures) -> Options {
        Options {
            protocol: Options::default().protocol - feature,
            ..Options::default()
        }
    }

    /// The default options with the back-end channel served by `channel`.
    pub fn channel(channel: ChannelKind) -> Options {
        Options {
            channel,
            ..Options::default()
        }
    }

    /// The default options with `regions` of guest RAM.
    pub fn regions(regions: Vec<(u64, u64)>) -> Options {
        Options {
            regions,
            ..Options::default()
        }
    }
}

/// A daemon with two request queues and a VM connected with all of them.
pub fn two_queue_daemon() -> (TestDaemon, Vm) {
    let d = TestDaemon::start(|c| c.request_queues = 2);
    let vm = Vm::connect_with(&d.socket(0), Options::two_request_queues());
    (d, vm)
}

/// An `OPEN` of `uuid` (BY_UUID).
pub fn open_by_uuid(uuid: [u8; 16]) -> Request {
    Request::Open {
        uuid: Some(uuid),
        name: Vec::new(),
    }
}

/// The vhost-user message naming `uuid`.
pub fn shared_msg(uuid: [u8; 16]) -> vhost::vhost_user::message::VhostUserSharedMsg {
    vhost::vhost_user::message::VhostUserSharedMsg {
        uuid: uuid::Uuid::from_bytes(uuid),
    }
}

/// The front-end side of the back-end channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// No `SET_BACKEND_REQ_FD`.
    None,
    /// [`ChannelPeer`], written from the vhost-user specification.
    Peer,
    /// The `vhost` crate's `FrontendReqHandler` ([`CrateChannel`]), as
    /// Cloud Hypervisor uses it.
    Crate,
}

/// Guest RAM: memfd-backed regions mapped here and shared with the daemon.
pub struct Ram {
    pub mem: GuestMemoryMmap<()>,
    /// Next free byte of the data area (bump allocation in region 0).
    next: u64,
    limit: u64,
}

impl Ram {
    pub fn new(regions: &[(u64, u64)]) -> Ram {
        let ranges: Vec<_> = regions
            .iter()
            .enumerate()
            .map(|(i, &(gpa, size))| {
                (
                    GuestAddress(gpa),
                    size as usize,
                    Some(FileOffset::new(memfd(&format!("guest-ram{i}"), size), 0)),
                )
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).expect("guest memory");
        let (base, size) = regions[0];
        Ram {
            mem,
            // The rings take the first MiB.
            next: base + (1 << 20),
            limit: base + size,
        }
    }

    /// `len` bytes of guest RAM, 64-byte aligned (page aligned with `page`).
    pub fn alloc(&mut self, len: u64, page: bool) -> u64 {
        let align = if page { 4096 } else { 64 };
        let at = self.next.div_ceil(align) * align;
        assert!(at + len <= self.limit, "test guest RAM exhausted");
        self.next = at + len;
        at
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .expect("write");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(gpa))
            .expect("read");
        out
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("mapped") as u64
    }

    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("file-backed"))
            .collect()
    }
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub gpa: u64,
    pub len: u32,
    pub writable: bool,
}

/// The driver side of one split virtqueue in guest RAM.
pub struct Queue {
    pub index: usize,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_idx: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// Used entries seen but not yet claimed.
    pending: HashMap<u16, u32>,
}

impl Queue {
    fn new(index: usize, size: u16, ram: &mut Ram) -> Queue {
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, true);
        let avail = ram.alloc(6 + 2 * n, true);
        let used = ram.alloc(6 + 8 * n, true);
        Queue {
            index,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            pending: HashMap::new(),
        }
    }

    fn config(&self, ram: &Ram) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.hva(self.desc),
            used_ring_addr: ram.hva(self.used),
            avail_ring_addr: ram.hva(self.avail),
            log_addr: None,
        }
    }

    /// Writes descriptor `i` of `table`: (addr, len, flags, next).
    fn write_desc(ram: &Ram, table: u64, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let at = table + 16 * u64::from(i);
        ram.mem
            .write_obj(addr.to_le(), GuestAddress(at))
            .expect("desc");
        ram.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .expect("desc");
        ram.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .expect("desc");
        ram.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .expect("desc");
    }

    fn publish(&mut self, ram: &Ram, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        ram.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        ram.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
        fence(Ordering::SeqCst);
    }

    /// Makes a chain of `bufs` available; returns its head.
    pub fn add(&mut self, ram: &Ram, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty());
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("free descriptors"))
            .collect();
        for (k, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            let next = ids.get(k + 1).copied().unwrap_or(0);
            if k + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            Self::write_desc(ram, self.desc, ids[k], (b.gpa, b.len, flags, next));
        }
        let head = ids[0];
        self.chains.insert(head, ids);
        self.publish(ram, head);
        head
    }

    /// Makes a chain available through one indirect descriptor table.
    pub fn add_indirect(&mut self, ram: &mut Ram, bufs: &[Buf]) -> u16 {
        let table = ram.alloc(16 * bufs.len() as u64, false);
        for (k, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            Self::write_desc(ram, table, k as u16, (b.gpa, b.len, flags, (k + 1) as u16));
        }
        let id = self.free.pop().expect("free descriptors");
        Self::write_desc(
            ram,
            self.desc,
            id,
            (table, 16 * bufs.len() as u32, VRING_DESC_F_INDIRECT, 0),
        );
        self.chains.insert(id, vec![id]);
        self.publish(ram, id);
        id
    }

    pub fn notify(&self) {
        self.kick.write(1).expect("kick");
    }

    /// Reads new used entries into `pending`; frees their descriptors.
    fn collect(&mut self, ram: &Ram) {
        fence(Ordering::SeqCst);
        let idx: u16 = u16::from_le(
            ram.mem
                .read_obj(GuestAddress(self.used + 2))
                .expect("used idx"),
        );
        fence(Ordering::SeqCst);
        while self.used_idx != idx {
            let slot = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
            let id: u32 = u32::from_le(ram.mem.read_obj(GuestAddress(slot)).expect("used"));
            let len: u32 = u32::from_le(ram.mem.read_obj(GuestAddress(slot + 4)).expect("used"));
            let id = id as u16;
            let ids = self
                .chains
                .remove(&id)
                .expect("used entry for a chain we made");
            self.free.extend(ids);
            assert!(
                self.pending.insert(id, len).is_none(),
                "chain {id} returned twice"
            );
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        // EVENT_IDX: ask for a call at the next used entry.
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        ram.mem
            .write_obj(self.used_idx.to_le(), GuestAddress(used_event))
            .expect("used_event");
    }

    /// `used.len` of chain `head` if it came back.
    pub fn try_used(&mut self, ram: &Ram, head: u16) -> Option<u32> {
        self.collect(ram);
        self.pending.remove(&head)
    }

    /// Waits until chain `head` comes back; returns its `used.len`.
    pub fn wait_used(&mut self, ram: &Ram, head: u16) -> u32 {
        poll_until(&format!("chain {head} on queue {}", self.index), || {
            self.try_used(ram, head)
        })
    }

    /// The device's `avail_event` (EVENT_IDX): how far it has taken chains.
    pub fn device_avail_event(&self, ram: &Ram) -> u16 {
        fence(Ordering::SeqCst);
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(ram.mem.read_obj(GuestAddress(at)).expect("avail_event"))
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self, ram: &Ram) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(
            ram.mem
                .read_obj(GuestAddress(self.used + 2))
                .expect("used idx"),
        )
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants a call once the used
    /// index passes `idx`.
    pub fn set_used_event(&self, ram: &Ram, idx: u16) {
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        ram.mem
            .write_obj(idx.to_le(), GuestAddress(used_event))
            .expect("used_event");
        fence(Ordering::SeqCst);
    }

    /// Waits until the device took every chain made available (EVENT_IDX).
    pub fn wait_taken(&self, ram: &Ram) {
        poll_until(&format!("queue {} to be drained", self.index), || {
            (self.device_avail_event(ram) == self.avail_idx).then_some(())
        });
    }

    /// Chains returned so far and not claimed.
    pub fn returned(&mut self, ram: &Ram) -> usize {
        self.collect(ram);
        self.pending.len()
    }
}

/// A request sent on a queue, waiting for its response.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub queue: usize,
    pub head: u16,
    pub tag: u64,
    pub opcode: Opcode,
    pub reply_gpa: u64,
    pub reply_len: u32,
}

/// A connected test VM.
pub struct Vm {
    pub fe: Frontend,
    pub ram: Ram,
    pub queues: Vec<Queue>,
    pub channel: Option<ChannelPeer>,
    pub crate_channel: Option<CrateChannel>,
    pub options: Options,
    next_tag: u64,
}

impl Vm {
    /// Connects with the default options.
    pub fn connect(path: &Path) -> Vm {
        Vm::connect_with(path, Options::default())
    }

    pub fn connect_with(path: &Path, options: Options) -> Vm {
        let mut ram = Ram::new(&options.regions);
        let queues = (0..options.queues)
            .map(|i| Queue::new(i, options.queue_size, &mut ram))
            .collect();
        let fe = Frontend::connect(path, options.queues as u64).expect("connect");
        let mut vm = Vm {
            fe,
            ram,
            queues,
            channel: None,
            crate_channel: None,
            options,
            next_tag: 1,
        };
        vm.negotiate();
        vm.setup_rings();
        vm
    }

    pub fn features(&self) -> u64 {
        let mut f =
            VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_INDIRECT_DESC;
        if self.options.event_idx {
            f |= VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    fn negotiate(&mut self) {
        self.fe.set_owner().expect("SET_OWNER");
        let offered = self.fe.get_features().expect("GET_FEATURES");
        assert_ne!(offered & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        let pf = self
            .fe
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let acked = pf & self.options.protocol;
        self.fe
            .set_protocol_features(acked)
            .expect("SET_PROTOCOL_FEATURES");
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let reply_ack = acked.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            match self.options.channel {
                ChannelKind::None => {}
                ChannelKind::Peer => {
                    let (peer, theirs) = ChannelPeer::new(reply_ack);
                    self.fe
                        .set_backend_request_fd(&theirs)
                        .expect("SET_BACKEND_REQ_FD");
                    drop(theirs);
                    self.channel = Some(peer);
                }
                ChannelKind::Crate => {
                    let (chan, tx) = CrateChannel::new(reply_ack);
                    self.fe
                        .set_backend_request_fd(&tx)
                        .expect("SET_BACKEND_REQ_FD");
                    self.crate_channel = Some(chan);
                }
            }
        }
        self.fe
            .set_features(self.features() & offered)
            .expect("SET_FEATURES");
        self.fe
            .set_mem_table(&self.ram.region_infos())
            .expect("SET_MEM_TABLE");
    }

    /// Sets up every ring (size, base, addresses, call, kick, enable).
    pub fn setup_rings(&mut self) {
        for q in &self.queues {
            self.fe
                .set_vring_num(q.index, q.size)
                .expect("SET_VRING_NUM");
            self.fe.set_vring_base(q.index, 0).expect("SET_VRING_BASE");
            self.fe
                .set_vring_addr(q.index, &q.config(&self.ram))
                .expect("SET_VRING_ADDR");
            self.fe
                .set_vring_call(q.index, &q.call)
                .expect("SET_VRING_CALL");
            self.fe
                .set_vring_kick(q.index, &q.kick)
                .expect("SET_VRING_KICK");
            self.fe
                .set_vring_enable(q.index, true)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// Starts queue `index` afresh after a stop (ring reset to empty).
    pub fn restart_ring(&mut self, index: usize) {
        let size = self.options.queue_size;
        self.queues[index] = Queue::new(index, size, &mut self.ram);
        let q = &self.queues[index];
        self.fe.set_vring_num(index, size).expect("SET_VRING_NUM");
        self.fe.set_vring_base(index, 0).expect("SET_VRING_BASE");
        self.fe
            .set_vring_addr(index, &q.config(&self.ram))
            .expect("SET_VRING_ADDR");
        self.fe
            .set_vring_call(index, &q.call)
            .expect("SET_VRING_CALL");
        self.fe
            .set_vring_kick(index, &q.kick)
            .expect("SET_VRING_KICK");
        self.fe
            .set_vring_enable(index, true)
            .expect("SET_VRING_ENABLE");
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Sends `request` on `queue` with `reply_len` writable bytes.
    pub fn send_sized(&mut self, queue: usize, request: &Request, reply_len: u32) -> Sent {
        let sent = self.post(queue, request, reply_len);
        self.queues[queue].notify();
        sent
    }

    /// Makes `request` available on `queue` without a kick (several chains
    /// then go in one batch).
    pub fn post(&mut self, queue: usize, request: &Request, reply_len: u32) -> Sent {
        let tag = self.tag();
        let bytes = encode_request(tag, request);
        let req_gpa = self.ram.alloc(bytes.len() as u64, false);
        self.ram.write(req_gpa, &bytes);
        let reply_gpa = self.ram.alloc(u64::from(reply_len), false);
        let head = self.queues[queue].add(
            &self.ram,
            &[
                Buf {
                    gpa: req_gpa,
                    len: bytes.len() as u32,
                    writable: false,
                },
                Buf {
                    gpa: reply_gpa,
                    len: reply_len,
                    writable: true,
                },
            ],
        );
        Sent {
            queue,
            head,
            tag,
            opcode: request.opcode(),
            reply_gpa,
            reply_len,
        }
    }

    /// Sends `request` on `queue` with room for any fixed reply and a few
    /// segments.
    pub fn send(&mut self, queue: usize, request: &Request) -> Sent {
        let room = match request {
            Request::TransferFromHost { len, .. } => RESP_HDR_SIZE as u32 + *len as u32,
            Request::Map { max_entries, .. } => {
                (RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE) as u32 + 16 * *max_entries
            }
            _ => (RESP_HDR_SIZE + INFO_SIZE) as u32,
        };
        self.send_sized(queue, request, room)
    }

    /// The response of a sent request, once its chain is back.
    pub fn wait(&mut self, sent: Sent) -> Response {
        let len = self.queues[sent.queue].wait_used(&self.ram, sent.head);
        self.decode(sent, len)
    }

    /// The tag and the response, once the chain is back.
    pub fn wait_tagged(&mut self, sent: Sent) -> (u64, Response) {
        let len = self.queues[sent.queue].wait_used(&self.ram, sent.head);
        assert!(len as usize >= RESP_HDR_SIZE, "used.len {len}");
        let bytes = self.ram.read(sent.reply_gpa, len as usize);
        decode_response(sent.opcode, &bytes).expect("decodable response")
    }

    /// The response, if the chain is back already.
    pub fn try_wait(&mut self, sent: Sent) -> Option<Response> {
        let len = self.queues[sent.queue].try_used(&self.ram, sent.head)?;
        Some(self.decode(sent, len))
    }

    fn decode(&self, sent: Sent, len: u32) -> Response {
        assert!(
            len <= sent.reply_len,
            "used.len {len} beyond the writable part"
        );
        let bytes = self.ram.read(sent.reply_gpa, len as usize);
        let (_tag, response) = decode_response(sent.opcode, &bytes).expect("decodable response");
        response
    }

    /// Sends and waits.
    pub fn call(&mut self, queue: usize, request: &Request) -> Response {
        let sent = self.send(queue, request);
        self.wait(sent)
    }

    pub fn info(&mut self) -> Info {
        match self.call(0, &Request::GetInfo) {
            Ok(Reply::Info(info)) => info,
            other => panic!("GET_INFO: {other:?}"),
        }
    }

    /// CREATE of a host-placed static object of `size` bytes.
    pub fn create(&mut self, size: u64) -> ObjectReply {
        match self.call(
            0,
            &Request::Create {
                size,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None,
            },
        ) {
            Ok(Reply::Object(o)) => o,
            other => panic!("CREATE: {other:?}"),
        }
    }

    pub fn acquire(&mut self) -> u64 {
        match self.call(0, &Request::AcquireInit) {
            Ok(Reply::Acquire { ctx, .. }) => ctx,
            other => panic!("ACQUIRE_INIT: {other:?}"),
        }
    }

    pub fn lock_request(ctx: u64, object: u64) -> Request {
        Request::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        }
    }

    pub fn transfer_to(&mut self, object: u64, offset: u64, data: &[u8]) -> Response {
        self.call(
            0,
            &Request::TransferToHost {
                object,
                offset,
                data: data.to_vec(),
            },
        )
    }

    pub fn transfer_from(&mut self, object: u64, offset: u64, len: u64) -> Vec<u8> {
        match self.call(
            0,
            &Request::TransferFromHost {
                object,
                offset,
                len,
            },
        ) {
            Ok(Reply::Data(d)) => d,
            other => panic!("TRANSFER_FROM_HOST: {other:?}"),
        }
    }

    pub fn release(&mut self, object: u64) -> Response {
        self.call(0, &Request::Release { object })
    }

    pub fn unlock(&mut self, ctx: u64, object: u64) -> Response {
        self.call(0, &Request::Unlock { ctx, object })
    }

    /// A LOCK with the TRY flag.
    pub fn try_lock(&mut self, ctx: u64, object: u64) -> Response {
        self.call(
            0,
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
    pub fn lock_held(&mut self) -> (u64, u64, u64) {
        let obj = self.create(4096).object;
        let (a, b) = (self.acquire(), self.acquire());
        assert_eq!(self.call(0, &Vm::lock_request(a, obj)), Ok(Reply::Empty));
        (obj, a, b)
    }

    /// ATTACH of a static importer; returns the attachment.
    pub fn attach(&mut self, object: u64, peer2peer: bool) -> u64 {
        match self.call(
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

    /// MAP with no fence context.
    pub fn map(&mut self, attachment: u64, dir: Direction, max_entries: u32) -> MapReply {
        match self.call(
            0,
            &Request::Map {
                attachment,
                dir,
                max_entries,
                ctx: 0,
            },
        ) {
            Ok(Reply::Map(m)) => m,
            other => panic!("MAP: {other:?}"),
        }
    }

    /// UNMAP with no fence context.
    pub fn unmap(&mut self, mapping: u64) -> Response {
        self.call(0, &Request::Unmap { mapping, ctx: 0 })
    }

    pub fn map_shm(&mut self, object: u64, writable: bool) -> Response {
        self.call(0, &Request::MapShm { object, writable })
    }

    pub fn export_uuid(&mut self, object: u64) -> Response {
        self.call(0, &Request::ExportUuid { object })
    }

    /// The UUID EXPORT_UUID publishes `object` under.
    pub fn exported_uuid(&mut self, object: u64) -> [u8; 16] {
        match self.export_uuid(object) {
            Ok(Reply::Uuid(u)) => u,
            other => panic!("EXPORT_UUID: {other:?}"),
        }
    }

    /// The back-end channel's hand-rolled peer.
    pub fn peer(&self) -> &ChannelPeer {
        self.channel.as_ref().expect("channel")
    }

    /// A device-readable buffer holding `bytes`.
    pub fn readable(&mut self, bytes: &[u8]) -> Buf {
        let gpa = self.ram.alloc(bytes.len().max(1) as u64, false);
        self.ram.write(gpa, bytes);
        Buf {
            gpa,
            len: bytes.len() as u32,
            writable: false,
        }
    }

    /// A device-writable buffer of `len` bytes.
    pub fn writable(&mut self, len: u32) -> Buf {
        Buf {
            gpa: self.ram.alloc(u64::from(len), false),
            len,
            writable: true,
        }
    }

    /// Makes every chain of `batch` available on `queue` with one kick;
    /// returns each chain's `used.len`, in order.
    pub fn run_batch(&mut self, queue: usize, batch: &[&[Buf]]) -> Vec<u32> {
        let heads: Vec<u16> = batch
            .iter()
            .map(|bufs| self.queues[queue].add(&self.ram, bufs))
            .collect();
        self.queues[queue].notify();
        heads
            .iter()
            .map(|h| self.queues[queue].wait_used(&self.ram, *h))
            .collect()
    }

    /// (status, tag) of the response header written into `b`.
    pub fn response_header(&self, b: &Buf) -> (u32, u64) {
        let r = self.ram.read(b.gpa, 16);
        (
            u32::from_le_bytes(r[0..4].try_into().expect("4")),
            u64::from_le_bytes(r[8..16].try_into().expect("8")),
        )
    }

    /// Posts one eventq buffer of `len` bytes; returns (head, gpa).
    pub fn post_event_buffer(&mut self, len: u32) -> (u16, u64) {
        let gpa = self.ram.alloc(u64::from(len), false);
        let head = self.queues[EVENTQ as usize].add(
            &self.ram,
            &[Buf {
                gpa,
                len,
                writable: true,
            }],
        );
        self.queues[EVENTQ as usize].notify();
        (head, gpa)
    }

    /// Waits for an event in the buffer `head` at `gpa`.
    pub fn wait_event(&mut self, head: u16, gpa: u64) -> Event {
        let len = self.queues[EVENTQ as usize].wait_used(&self.ram, head);
        assert_eq!(len as usize, EVENT_SIZE);
        Event::from_bytes(&self.ram.read(gpa, EVENT_SIZE)).expect("event")
    }
}

/// What the daemon sent on the back-end channel.
#[derive(Debug)]
pub enum ChannelMsg {
    ShmemMap {
        shmid: u8,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
        flags: u64,
        fd: Option<OwnedFd>,
    },
    ShmemUnmap {
        shm_offset: u64,
        len: u64,
    },
    Add([u8; 16]),
    Remove([u8; 16]),
    Lookup([u8; 16]),
}

/// How the peer answers a `LOOKUP`.
#[derive(Debug)]
pub enum LookupAnswer {
    /// Success with this fd.
    Fd(OwnedFd),
    /// A non-zero result, no fd.
    Refuse,
    /// Success without an fd (what QEMU does).
    NoFd,
}

#[derive(Debug, Default)]
pub struct ChannelState {
    pub messages: Vec<ChannelMsg>,
    /// (request, header flags) of every message, in order.
    pub headers: Vec<(u32, u32)>,
    pub lookups: HashMap<[u8; 16], LookupAnswer>,
    /// Requests (by number) to answer with a failure.
    pub refuse: Vec<u32>,
    /// While true, LOOKUP replies wait.
    pub hold_lookups: bool,
}

/// The front-end's side of the back-end channel, hand-rolled from the
/// vhost-user specification (the `vhost` crate's `FrontendReqHandler`
/// expects an fd in the LOOKUP request, which the specification does not).
pub struct ChannelPeer {
    pub state: Arc<(Mutex<ChannelState>, Condvar)>,
    sock: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl ChannelPeer {
    /// Returns the peer and the end to hand to the daemon.
    pub fn new(reply_ack: bool) -> (ChannelPeer, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let state = Arc::new((Mutex::new(ChannelState::default()), Condvar::new()));
        let sock = ours.try_clone().expect("clone");
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || serve_channel(ours, st, reply_ack));
        (
            ChannelPeer {
                state,
                sock,
                thread: Some(thread),
            },
            theirs,
        )
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut ChannelState) -> T) -> T {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().expect("channel state");
        let out = f(&mut st);
        cv.notify_all();
        out
    }

    /// Waits until a received message satisfies `f`.
    pub fn wait_for_msg(&self, what: &str, f: impl Fn(&ChannelMsg) -> bool) {
        self.wait_for(what, |msgs| msgs.iter().any(&f).then_some(()));
    }

    /// Waits until `f` finds something in the received messages.
    pub fn wait_for<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut Vec<ChannelMsg>) -> Option<T>,
    ) -> T {
        poll_until(what, || self.with(|st| f(&mut st.messages)))
    }
}

impl Drop for ChannelPeer {
    fn drop(&mut self) {
        self.with(|st| st.hold_lookups = false);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_exact_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> bool {
    let mut got = 0;
    while got < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let Ok(msg) = recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) else {
            return false;
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        if msg.bytes == 0 {
            return false;
        }
        got += msg.bytes;
    }
    true
}

fn reply(sock: &UnixStream, request: u32, value: u64, fd: Option<&OwnedFd>) {
    let mut out = Vec::new();
    out.extend_from_slice(&request.to_ne_bytes());
    out.extend_from_slice(&(0x1u32 | 0x4).to_ne_bytes());
    out.extend_from_slice(&8u32.to_ne_bytes());
    out.extend_from_slice(&value.to_ne_bytes());
    let fds: Vec<_> = fd.map(|f| f.as_fd()).into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    }
    let _ = sendmsg(
        sock,
        &[IoSlice::new(&out)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn serve_channel(sock: UnixStream, state: Arc<(Mutex<ChannelState>, Condvar)>, reply_ack: bool) {
    loop {
        let mut header = [0u8; 12];
        let mut fds = Vec::new();
        if !read_exact_fds(&sock, &mut header, &mut fds) {
            return;
        }
        let request = u32::from_ne_bytes(header[0..4].try_into().expect("4"));
        let flags = u32::from_ne_bytes(header[4..8].try_into().expect("4"));
        let size = u32::from_ne_bytes(header[8..12].try_into().expect("4")) as usize;
        let mut body = vec![0u8; size];
        if size > 0 && !read_exact_fds(&sock, &mut body, &mut fds) {
            return;
        }
        let uuid = || -> [u8; 16] { body[..16].try_into().expect("uuid") };
        let msg = match request {
            9 => ChannelMsg::ShmemMap {
                shmid: body[0],
                fd_offset: u64_at(&body, 8),
                shm_offset: u64_at(&body, 16),
                len: u64_at(&body, 24),
                flags: u64_at(&body, 32),
                fd: fds.pop(),
            },
            10 => ChannelMsg::ShmemUnmap {
                shm_offset: u64_at(&body, 16),
                len: u64_at(&body, 24),
            },
            6 => ChannelMsg::Add(uuid()),
            7 => ChannelMsg::Remove(uuid()),
            8 => ChannelMsg::Lookup(uuid()),
            other => panic!("unexpected back-end request {other}"),
        };
        let (lock, cv) = &*state;
        let mut st = lock.lock().expect("state");
        let refuse = st.refuse.contains(&request);
        st.messages.push(msg);
        st.headers.push((request, flags));
        cv.notify_all();
        if request == 8 {
            let key = uuid();
            while st.hold_lookups {
                st = cv.wait(st).expect("state");
            }
            match st.lookups.remove(&key) {
                Some(LookupAnswer::Fd(fd)) => reply(&sock, 8, 0, Some(&fd)),
                Some(LookupAnswer::NoFd) => reply(&sock, 8, 0, None),
                Some(LookupAnswer::Refuse) | None => reply(&sock, 8, 1, None),
            }
        } else if reply_ack && flags & 0x8 != 0 {
            reply(&sock, request, u64::from(refuse), None);
        }
    }
}

/// Reads `len` bytes at `offset` of an fd (a memfd or a mapping of one).
pub fn read_fd(file: &File, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, offset).expect("pread");
    out
}

/// One `SHMEM_MAP` as the `vhost` crate's handler received it.
#[derive(Debug)]
pub struct Mapped {
    pub shmid: u8,
    pub fd_offset: u64,
    pub shm_offset: u64,
    pub len: u64,
    pub flags: u64,
    pub file: File,
}

/// What the `vhost` crate's front-end handler was asked.
#[derive(Debug, Default)]
pub struct CrateLog {
    pub maps: Vec<Mapped>,
    pub unmaps: Vec<(u64, u64)>,
    pub added: Vec<uuid::Uuid>,
    pub removed: Vec<uuid::Uuid>,
}

struct CrateHandler {
    log: Arc<Mutex<CrateLog>>,
}

fn dup_raw(fd: &dyn std::os::fd::AsRawFd) -> File {
    // SAFETY: the handler passes an fd that is open for the duration of
    // the call; it is only duplicated here.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    File::from(borrowed.try_clone_to_owned().expect("dup"))
}

impl vhost::vhost_user::VhostUserFrontendReqHandlerMut for CrateHandler {
    fn shmem_map(
        &mut self,
        req: &vhost::vhost_user::message::VhostUserMMap,
        fd: &dyn std::os::fd::AsRawFd,
    ) -> vhost::vhost_user::HandlerResult<u64> {
        let r = *req;
        self.log.lock().expect("log").maps.push(Mapped {
            shmid: r.shmid,
            fd_offset: r.fd_offset,
            shm_offset: r.shm_offset,
            len: r.len,
            flags: r.flags,
            file: dup_raw(fd),
        });
        Ok(0)
    }

    fn shmem_unmap(
        &mut self,
        req: &vhost::vhost_user::message::VhostUserMMap,
    ) -> vhost::vhost_user::HandlerResult<u64> {
        let r = *req;
        self.log
            .lock()
            .expect("log")
            .unmaps
            .push((r.shm_offset, r.len));
        Ok(0)
    }

    fn shared_object_add(
        &mut self,
        uuid: &vhost::vhost_user::message::VhostUserSharedMsg,
    ) -> vhost::vhost_user::HandlerResult<u64> {
        self.log.lock().expect("log").added.push(uuid.uuid);
        Ok(0)
    }

    fn shared_object_remove(
        &mut self,
        uuid: &vhost::vhost_user::message::VhostUserSharedMsg,
    ) -> vhost::vhost_user::HandlerResult<u64> {
        self.log.lock().expect("log").removed.push(uuid.uuid);
        Ok(0)
    }
}

/// The back-end channel served by the `vhost` crate's `FrontendReqHandler`.
pub struct CrateChannel {
    pub log: Arc<Mutex<CrateLog>>,
    /// A duplicate of the handler's socket, to hang it up.
    rx: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl CrateChannel {
    /// Returns the channel and the fd to hand to the daemon.
    pub fn new(reply_ack: bool) -> (CrateChannel, OwnedFd) {
        use std::os::fd::AsRawFd;
        let log = Arc::new(Mutex::new(CrateLog::default()));
        let handler = Arc::new(Mutex::new(CrateHandler {
            log: Arc::clone(&log),
        }));
        let mut srv = vhost::vhost_user::FrontendReqHandler::new(handler).expect("handler");
        srv.set_reply_ack_flag(reply_ack);
        // SAFETY: both fds belong to `srv`, alive here; they are only
        // duplicated.
        let (rx, tx) = unsafe {
            (
                std::os::fd::BorrowedFd::borrow_raw(srv.as_raw_fd())
                    .try_clone_to_owned()
                    .expect("dup"),
                std::os::fd::BorrowedFd::borrow_raw(srv.get_tx_raw_fd())
                    .try_clone_to_owned()
                    .expect("dup"),
            )
        };
        let thread = std::thread::spawn(move || loop {
            match srv.handle_request() {
                Ok(_) => {}
                Err(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage
                    | vhost::vhost_user::Error::SocketBroken(_),
                ) => break,
                Err(e) => eprintln!("front-end handler: {e}"),
            }
        });
        (
            CrateChannel {
                log,
                rx,
                thread: Some(thread),
            },
            tx,
        )
    }

    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&mut CrateLog) -> Option<T>) -> T {
        poll_until(what, || f(&mut self.log.lock().expect("log")))
    }
}

impl Drop for CrateChannel {
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.rx, rustix::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
