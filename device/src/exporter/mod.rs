// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The dma-buf model: objects, attachments, the reservation lock, fences,
//! cached mappings and the direction-to-sync rules (contract sections 6 to 9).
//!
//! No transport types here. The daemon feeds typed requests from many
//! queues and guests into one [`Exporter`]; each request either completes at
//! once or is *parked* (waiting for a lock, a fence or a timer) and completes
//! later, when what it waits for changes, through [`Exporter::take_completions`].
//! Nothing here ever blocks a thread.
//!
//! Where each rule lives:
//! - `objects.rs`: CREATE, OPEN, RELEASE, EXPORT_UUID, object lifetime (7.2);
//!   which objects hold fds, the fd quota, and the promotion of a slab
//!   extent before its fd is handed out
//! - `attach.rs`: ATTACH/DETACH/MAP/UNMAP/PIN/UNPIN, static/dynamic rules,
//!   cached mappings and the EBUSY direction rule (7.3)
//! - `lock.rs` and `resv.rs`: acquire contexts and wait-die (7.4)
//! - `cpu.rs`: CPU access, shared-memory window, TRANSFER (7.5)
//! - `fence.rs`: fences and WAIT (7.6)
//! - `host_fences.rs`: the host kernel's fences on kernel dma-bufs, both
//!   ways (`docs/protocol.md`, "Host fences")
//! - `events.rs`: eventq events (8)
//! - `sync.rs`: direction to host sync (9)
//! - `host.rs`: host exports, revoke, evict, list, stats (10, 11)
//! - `session.rs`: guests, quotas, reset (6, 7.1)
//! - `pending.rs`: the parked-request machinery (park, wake, complete, cancel)
//! - this file: dispatch

mod attach;
mod cpu;
mod events;
mod fence;
mod host;
mod host_fences;
mod lock;
mod objects;
mod pending;
mod resv;
mod session;
mod status;
pub mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use virtio_dmabuf_protocol::{FenceUsage, Opcode, Request, Response, Segment, Status};

use crate::provider::{Backing, FenceSource, Provider};

pub use cpu::InPlace;
pub use host::{
    AttachmentInfo, ExportSpec, HostError, HostOpId, LockHolderInfo, ObjectInfo, StatsSnapshot,
};
pub use host_fences::{HostFenceSetting, HostFenceStats};
pub use session::GuestCaps;

pub(crate) use pending::{Owner, Pending, Work};

/// A guest: the index of its front-end socket.
pub type GuestId = usize;

/// Where a request came from, so its completion can go back there: the
/// queue index and an opaque token (the daemon uses the descriptor head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub queue: u16,
    pub token: u64,
}

/// A parked request that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub guest: GuestId,
    pub origin: Origin,
    pub tag: u64,
    pub opcode: Opcode,
    pub response: Response,
}

/// Per-guest quotas, reported by `GET_INFO`; exceeding one is `ENOSPC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_objects: u32,
    pub max_bytes: u64,
    pub max_attachments: u32,
    pub max_contexts: u32,
    pub max_fences: u32,
    pub max_waiting: u32,
    pub max_pending_events: u32,
    pub max_segments: u32,
    /// Outstanding mappings per guest (not in `GET_INFO`; keeps a guest
    /// from growing the mapping table without bound).
    pub max_mappings: u32,
    /// Objects with fds of their own per guest (not in `GET_INFO`): every
    /// object of a provider without slabs, and of the memfd provider those
    /// above `SLAB_MAX_EXTENT`, promoted ones and imported shared objects
    /// (`objects.rs`, "fds"). The daemon sizes it so that every guest at
    /// it fits in the open-file limit.
    pub max_fd_objects: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_objects: 4096,
            max_bytes: 4 << 30,
            max_attachments: 16384,
            max_contexts: 1024,
            max_fences: 16384,
            max_waiting: 1024,
            max_pending_events: 1024,
            max_segments: 1024,
            max_mappings: 65536,
            max_fd_objects: 4096,
        }
    }
}

/// Settings of the model that do not depend on a guest.
#[derive(Debug, Clone)]
pub struct ExporterConfig {
    /// `max(host page size, 4096)`.
    pub page_size: u64,
    pub limits: Limits,
    /// A fence not signalled within this is signalled with `ETIMEDOUT`.
    pub fence_timeout: Duration,
    /// Number of queues the device has, eventq included.
    pub num_queues: u32,
    /// True when the host can register exports (a control socket or `--export`).
    pub host_exports: bool,
    /// Tests only: `EXPORT_UUID` of memfd objects.
    pub allow_memfd_shared_objects: bool,
    /// Look for a host fence source at start (`docs/protocol.md`, "Host
    /// fences").
    pub host_fences: HostFenceSetting,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            page_size: page_size(),
            limits: Limits::default(),
            fence_timeout: Duration::from_secs(10),
            num_queues: 2,
            host_exports: false,
            allow_memfd_shared_objects: false,
            host_fences: HostFenceSetting::Detect,
        }
    }
}

/// `max(host page size, 4096)` (contract section 3).
pub fn page_size() -> u64 {
    crate::provider::page_size().max(4096)
}

/// What the VMM front-end of one guest can do for the device. The daemon
/// implements it over the back-end channel and guest memory; the
/// defaults say the capability is not there.
pub trait Frontend: Send + std::fmt::Debug {
    /// Maps `len` bytes of `fd` at `shm_offset` of shared memory region 0.
    fn shm_map(
        &mut self,
        _shm_offset: u64,
        _fd: BorrowedFd<'_>,
        _len: u64,
        _writable: bool,
    ) -> Result<(), Status> {
        Err(Status::NotSupported)
    }
    /// Removes what `shm_map` placed at `shm_offset`.
    fn shm_unmap(&mut self, _shm_offset: u64, _len: u64) -> Result<(), Status> {
        Err(Status::NotSupported)
    }
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_ADD`.
    fn shared_object_add(&mut self, _uuid: &[u8; 16]) -> Result<(), Status> {
        Err(Status::NotSupported)
    }
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE`.
    fn shared_object_remove(&mut self, _uuid: &[u8; 16]) {}
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP`: the fd another device published.
    fn shared_object_lookup(&mut self, _uuid: &[u8; 16]) -> Result<OwnedFd, Status> {
        Err(Status::NotSupported)
    }
    /// A backing over guest RAM pages (already checked for alignment and
    /// size); `EFAULT` for entries outside guest RAM.
    fn guest_pages(&mut self, _entries: &[Segment]) -> Result<Box<dyn Backing>, Status> {
        Err(Status::NotSupported)
    }
}

/// A front-end that offers nothing: no shared memory, no shared objects,
/// no guest pages. Used before a front-end connects and in tests.
#[derive(Debug, Default)]
pub struct NoFrontend;

impl Frontend for NoFrontend {}

pub(crate) type ObjId = u64;

/// What a request needs before it can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The object's reservation lock must be free (or held for this request).
    Lock(ObjId),
    /// No fence of usage <= `usage` may be pending; `locked`: hold the
    /// object's lock (context-less) while waiting.
    Fences {
        object: ObjId,
        usage: FenceUsage,
        locked: bool,
    },
    /// `LOCK`: queue as the context in the object's waiter list.
    QueueCtx { object: ObjId, ctx: u64 },
    /// The host kernel's fences on the object's dma-buf must signal: the
    /// request runs again when `watch` fires (`host_fences.rs`).
    HostFences {
        object: ObjId,
        watch: u64,
        locked: bool,
    },
}

/// What one attempt to run a request came to: either its answer now, or
/// parked until what it needs (the [`Step`]) changes — never both.
#[derive(Debug)]
pub(crate) enum Outcome {
    Answer(Response),
    Parked(Step),
}

/// The result of one attempt to run a request; `Err` is an answer too.
pub(crate) type Attempt = Result<Outcome, Status>;

/// Id of a pending (parked) request, unique for the exporter's lifetime.
pub(crate) type PendingId = u64;

pub(crate) fn done(response: Response) -> Attempt {
    Ok(Outcome::Answer(response))
}

pub(crate) fn park_on(step: Step) -> Attempt {
    Ok(Outcome::Parked(step))
}

/// The whole state of the device, for every guest.
#[derive(Debug)]
pub struct Exporter {
    pub(crate) config: ExporterConfig,
    pub(crate) provider: Box<dyn Provider>,
    pub(crate) guests: Vec<session::Guest>,
    pub(crate) objects: BTreeMap<ObjId, objects::Object>,
    pub(crate) attachments: BTreeMap<u64, attach::Attachment>,
    pub(crate) mappings: BTreeMap<u64, attach::Mapping>,
    pub(crate) contexts: BTreeMap<u64, lock::Context>,
    pub(crate) fences: BTreeMap<u64, fence::Fence>,
    pub(crate) pending: BTreeMap<u64, Pending>,
    pub(crate) exports: BTreeMap<String, ObjId>,
    /// One counter for every handle the process hands out: never reused.
    next_handle: u64,
    next_stamp: u64,
    pub(crate) next_pending: PendingId,
    /// Objects whose lock queue or fence waiters must be looked at again.
    dirty: BTreeSet<ObjId>,
    completions: Vec<Completion>,
    host_completions: Vec<(HostOpId, Result<(), HostError>)>,
    pub(crate) stats: host::Stats,
    /// The host's source of signalable fences, found at start.
    pub(crate) host_source: Option<FenceSource>,
    /// What parked requests wait for on the host, by watch id.
    pub(crate) host_watches: BTreeMap<u64, host_fences::HostWatch>,
    pub(crate) next_watch: u64,
    pub(crate) host_counters: host_fences::HostFenceCounters,
}

impl Exporter {
    /// A model for `num_guests` guests (one per socket), all disconnected.
    pub fn new(config: ExporterConfig, provider: Box<dyn Provider>, num_guests: usize) -> Self {
        let limit = config.limits.max_pending_events as usize;
        let host_source = match config.host_fences {
            HostFenceSetting::Off => None,
            HostFenceSetting::Detect => match FenceSource::detect() {
                Ok(s) => {
                    log::info!(
                        "host fences: {} ({}): guest fences on kernel dma-bufs reach the host{}",
                        s.kind().name(),
                        s.node().display(),
                        match s.kind() {
                            crate::provider::FenceSourceKind::SwSync =>
                                "; a guest's error reaches it as ENOENT",
                            crate::provider::FenceSourceKind::Vgem =>
                                "; errors are not carried, and vgem signals a fence itself after 10 s",
                        }
                    );
                    Some(s)
                }
                Err(why) => {
                    log::info!(
                        "host fences: no source ({why}); guest fences stay in the device, \
                         FENCE_ATTACH with HOST is EOPNOTSUPP"
                    );
                    None
                }
            },
        };
        Exporter {
            guests: (0..num_guests)
                .map(|_| session::Guest::new(limit, provider.slab_pool()))
                .collect(),
            config,
            provider,
            objects: BTreeMap::new(),
            attachments: BTreeMap::new(),
            mappings: BTreeMap::new(),
            contexts: BTreeMap::new(),
            fences: BTreeMap::new(),
            pending: BTreeMap::new(),
            exports: BTreeMap::new(),
            next_handle: 1,
            next_stamp: 1,
            next_pending: 1,
            dirty: BTreeSet::new(),
            completions: Vec::new(),
            host_completions: Vec::new(),
            stats: host::Stats::default(),
            host_source,
            host_watches: BTreeMap::new(),
            next_watch: 1,
            host_counters: host_fences::HostFenceCounters::default(),
        }
    }

    /// Replaces the host fence source (tests give one or take it away).
    pub fn set_host_fence_source(&mut self, source: Option<FenceSource>) {
        self.host_source = source;
    }

    pub fn config(&self) -> &ExporterConfig {
        &self.config
    }

    /// A new handle; `ENOSPC` once the 64-bit counter is spent.
    pub(crate) fn new_handle(&mut self) -> Result<u64, Status> {
        let h = self.next_handle;
        self.next_handle = h.checked_add(1).ok_or(Status::NoSpc)?;
        Ok(h)
    }

    pub(crate) fn new_stamp(&mut self) -> u64 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    pub(crate) fn mark_dirty(&mut self, object: ObjId) {
        self.dirty.insert(object);
    }

    /// Runs one request of `guest`. `Some` is its response now; `None`
    /// means it is parked and will come back through [`Self::take_completions`].
    pub fn submit(
        &mut self,
        guest: GuestId,
        origin: Origin,
        tag: u64,
        request: Request,
        now: Instant,
    ) -> Option<Response> {
        let opcode = request.opcode();
        if guest >= self.guests.len() {
            return Some(Err(Status::Inval));
        }
        let pending_id = self.next_pending;
        self.next_pending += 1;
        let owner = Owner::Guest { guest, origin, tag };
        let work = Work::Guest(request);
        let result = match self.attempt(owner, pending_id, &work, now) {
            Ok(Outcome::Answer(response)) => Some(response),
            Ok(Outcome::Parked(step)) => {
                let deadline = match &work {
                    Work::Guest(Request::Wait { timeout_ns, .. }) => {
                        now.checked_add(Duration::from_nanos(*timeout_ns))
                    }
                    _ => None,
                };
                match self.park(pending_id, owner, work, step, deadline, now) {
                    Ok(()) => None,
                    Err(status) => Some(Err(status)),
                }
            }
            Err(status) => Some(Err(status)),
        };
        if let Some(response) = &result {
            self.stats.count(opcode, response);
        }
        self.pump(now);
        result
    }

    /// Parked requests that completed since the last call, in order.
    pub fn take_completions(&mut self) -> Vec<Completion> {
        std::mem::take(&mut self.completions)
    }

    /// Parked requests of one guest that completed, in order.
    pub fn take_completions_for(&mut self, guest: GuestId) -> Vec<Completion> {
        let (mine, rest) = std::mem::take(&mut self.completions)
            .into_iter()
            .partition(|c| c.guest == guest);
        self.completions = rest;
        mine
    }

    /// True when `guest` has completed parked requests to deliver. Asked
    /// once per request: inlined (a call here cost 4% of the 64-in-flight
    /// rate, docs/benchmarks.md).
    #[inline]
    pub fn has_completions(&self, guest: GuestId) -> bool {
        !self.completions.is_empty() && self.completions.iter().any(|c| c.guest == guest)
    }

    /// True when host operations (evict) completed and were not taken yet.
    pub fn has_host_completions(&self) -> bool {
        !self.host_completions.is_empty()
    }

    /// Grows each time a host fence watch is added: the timer thread polls
    /// the watches it saw, so a new one must wake it. (A watch that ends or
    /// fires needs no wake-up: the timer thread drops it on its next turn.)
    pub fn watch_epoch(&self) -> u64 {
        self.next_watch
    }

    /// Host operations (evict) that completed since the last call.
    pub fn take_host_completions(&mut self) -> Vec<(HostOpId, Result<(), HostError>)> {
        std::mem::take(&mut self.host_completions)
    }

    /// The next instant at which [`Self::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let p = self.pending.values().filter_map(Pending::timer);
        let f = self.fences.values().map(|f| f.deadline);
        p.chain(f).chain(self.next_recheck()).min()
    }

    /// Fires every timer due at `now`: fence timeouts, `WAIT` timeouts and
    /// eviction lock timeouts.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .fences
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.signal_fence(id, Status::TimedOut as u32, true);
        }
        self.fire_rechecks(now);
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.timer().is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for pending_id in due {
            let Some(p) = self.pending.get(&pending_id) else {
                continue;
            };
            let host = p.host_timed_out(now);
            if host {
                self.host_counters.wait_timeouts += 1;
                log::warn!("a request waited --fence-timeout for host fences: ETIMEDOUT");
            }
            match p.work {
                Work::Guest(_) => self.complete(pending_id, Err(Status::TimedOut)),
                Work::Evict if host => {
                    self.complete_host(pending_id, Err(HostError::HostFenceTimeout))
                }
                Work::Evict => self.complete_host(pending_id, Err(HostError::LockTimeout)),
            }
        }
        self.pump(now);
    }

    /// One attempt at a request: either it is done, or it says what it waits for.
    fn attempt(
        &mut self,
        owner: Owner,
        pending_id: PendingId,
        work: &Work,
        now: Instant,
    ) -> Attempt {
        match (owner, work) {
            (Owner::Guest { guest, tag, .. }, Work::Guest(req)) => {
                self.dispatch(guest, pending_id, tag, req, now)
            }
            (Owner::Host(_), Work::Evict) => self.attempt_evict(pending_id, now),
            _ => Err(Status::Inval),
        }
    }

    /// The handler of each opcode.
    fn dispatch(
        &mut self,
        guest: GuestId,
        pending_id: PendingId,
        tag: u64,
        req: &Request,
        now: Instant,
    ) -> Attempt {
        let _ = tag;
        match req {
            Request::GetInfo => done(Ok(self.get_info(guest))),
            Request::ResetSession => {
                self.reset_guest(guest);
                done(Ok(virtio_dmabuf_protocol::Reply::Empty))
            }
            Request::Cancel { tag } => self.cancel(guest, *tag),
            Request::Create {
                size,
                dynamic,
                cache_mapping,
                guest_pages,
            } => self.create(
                guest,
                *size,
                *dynamic,
                *cache_mapping,
                guest_pages.as_deref(),
            ),
            Request::Open { uuid, name } => self.open(guest, uuid.as_ref(), name),
            Request::Release { object } => self.release(guest, *object),
            Request::ExportUuid { object } => self.export_uuid(guest, *object),
            Request::Attach {
                object,
                dynamic_importer,
                peer2peer,
            } => self.attach(guest, pending_id, *object, *dynamic_importer, *peer2peer),
            Request::Detach { attachment } => self.detach(guest, pending_id, *attachment),
            Request::Map {
                attachment,
                dir,
                max_entries,
                ctx,
            } => self.map(guest, pending_id, *attachment, *dir, *max_entries, *ctx),
            Request::Unmap { mapping, ctx } => self.unmap(guest, pending_id, *mapping, *ctx),
            Request::Pin { attachment, ctx } => {
                self.pin(guest, pending_id, *attachment, *ctx, true)
            }
            Request::Unpin { attachment, ctx } => {
                self.pin(guest, pending_id, *attachment, *ctx, false)
            }
            Request::AcquireInit => self.acquire_init(guest),
            Request::AcquireFini { ctx } => self.acquire_fini(guest, *ctx),
            Request::Lock {
                ctx,
                object,
                try_lock,
                slow,
            } => self.lock(guest, *ctx, *object, *try_lock, *slow),
            Request::Unlock { ctx, object } => self.unlock(guest, *ctx, *object),
            Request::BeginCpuAccess { object, dir } => self.cpu_access(guest, *object, *dir, true),
            Request::EndCpuAccess { object, dir } => self.cpu_access(guest, *object, *dir, false),
            Request::MapShm { object, writable } => self.map_shm(guest, *object, *writable),
            Request::UnmapShm { object } => self.unmap_shm(guest, *object),
            Request::TransferToHost {
                object,
                offset,
                data,
            } => self.transfer_to_host(guest, *object, *offset, data),
            Request::TransferFromHost {
                object,
                offset,
                len,
            } => self.transfer_from_host(guest, *object, *offset, *len),
            Request::FenceAttach {
                ctx,
                object,
                usage,
                host,
            } => self.fence_attach(guest, *ctx, *object, *usage, *host, now),
            Request::FenceSignal { fence, error } => self.fence_signal(guest, *fence, *error),
            Request::Wait {
                object,
                usage,
                timeout_ns,
            } => self.wait(guest, *object, *usage, *timeout_ns),
        }
    }

    /// `CANCEL` (section 7.1).
    fn cancel(&mut self, guest: GuestId, tag: u64) -> Attempt {
        let found = self.pending.iter().find_map(|(id, p)| match p.owner {
            Owner::Guest {
                guest: g, tag: t, ..
            } if g == guest && t == tag => Some(*id),
            _ => None,
        });
        match found {
            Some(pending_id) => {
                self.complete(pending_id, Err(Status::Canceled));
                done(Ok(virtio_dmabuf_protocol::Reply::Empty))
            }
            None => Err(Status::NoEnt),
        }
    }

    /// A vring stopped (`GET_VRING_BASE`): its waiting chains complete with
    /// `ECANCELED` so the front-end gets them back; the guest's state stays.
    pub fn cancel_queue(&mut self, guest: GuestId, queue: u16, now: Instant) {
        self.cancel_where(|p| {
            matches!(p.owner, Owner::Guest { guest: g, origin, .. } if g == guest && origin.queue == queue)
        });
        self.pump(now);
    }

    /// One host sync on an object's backing, recorded; host failures are `EIO`.
    pub(crate) fn host_sync(&mut self, object: ObjId, flags: u64) -> Result<(), Status> {
        let Some(o) = self.objects.get(&object) else {
            return Err(Status::NoEnt);
        };
        let Some(backing) = &o.backing else {
            return Err(Status::NoEnt);
        };
        let mut entry = sync::SyncEntry {
            uuid: uuid::Uuid::from_bytes(o.uuid),
            flags,
            kernel: backing.is_real_dmabuf(),
            errno: None,
        };
        let uuid = entry.uuid;
        let result = backing.sync(flags);
        if let Err(e) = &result {
            entry.errno = Some(e.raw_os_error().unwrap_or(libc::EIO));
        }
        self.stats.syncs.record(entry);
        result.map_err(|e| {
            let doing = format_args!("host sync {} on {uuid} failed", sync::flags_name(flags));
            status::provider_status(status::ProviderCall::Access, doing, &e)
        })
    }
}
