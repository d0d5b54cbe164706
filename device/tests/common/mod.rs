// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small harness over the exporter core: real memfd provider, a recording
//! front-end, a hand-driven clock.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod daemon;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_device_dmabuf::exporter::{
    Completion, Exporter, ExporterConfig, Frontend, GuestCaps, HostError, HostFenceSetting, Limits,
    Origin,
};
use vhost_device_dmabuf::provider::{Backing, MemfdProvider, Provider, SyncRecord};
use virtio_dmabuf_protocol::*;

pub const PAGE: u64 = 4096;
/// Guest RAM the test front-end pretends to have: [0, 1 GiB).
pub const GUEST_RAM: u64 = 1 << 30;

/// What the test front-end was asked to do.
#[derive(Debug, Default)]
pub struct FrontendLog {
    pub shm_maps: Vec<(u64, u64, bool)>,
    pub shm_unmaps: Vec<(u64, u64)>,
    pub added: Vec<[u8; 16]>,
    pub removed: Vec<[u8; 16]>,
    /// What SHARED_OBJECT_LOOKUP answers: uuid -> an fd to dup.
    pub lookups: Vec<([u8; 16], Arc<OwnedFd>)>,
}

#[derive(Debug)]
pub struct TestFrontend {
    pub log: Arc<Mutex<FrontendLog>>,
}

impl Frontend for TestFrontend {
    fn shm_map(&mut self, off: u64, _fd: BorrowedFd<'_>, len: u64, w: bool) -> Result<(), Status> {
        self.log.lock().unwrap().shm_maps.push((off, len, w));
        Ok(())
    }
    fn shm_unmap(&mut self, off: u64, len: u64) -> Result<(), Status> {
        self.log.lock().unwrap().shm_unmaps.push((off, len));
        Ok(())
    }
    fn shared_object_add(&mut self, uuid: &[u8; 16]) -> Result<(), Status> {
        self.log.lock().unwrap().added.push(*uuid);
        Ok(())
    }
    fn shared_object_remove(&mut self, uuid: &[u8; 16]) {
        self.log.lock().unwrap().removed.push(*uuid);
    }
    fn shared_object_lookup(&mut self, uuid: &[u8; 16]) -> Result<OwnedFd, Status> {
        let log = self.log.lock().unwrap();
        let fd = log
            .lookups
            .iter()
            .find(|(u, _)| u == uuid)
            .map(|(_, fd)| fd.clone())
            .ok_or(Status::NoEnt)?;
        fd.try_clone().map_err(|_| Status::Io)
    }
    fn guest_pages(&mut self, entries: &[Segment]) -> Result<Box<dyn Backing>, Status> {
        if entries
            .iter()
            .any(|e| e.addr.checked_add(e.len).is_none_or(|end| end > GUEST_RAM))
        {
            return Err(Status::Fault);
        }
        let size = entries.iter().map(|e| e.len).sum();
        MemfdProvider::new(GUEST_RAM)
            .allocate(size)
            .map_err(|_| Status::NoMem)
    }
}

pub struct Dev {
    pub ex: Exporter,
    pub record: SyncRecord,
    pub now: Instant,
    pub fe: Vec<Arc<Mutex<FrontendLog>>>,
    next_token: u64,
}

pub fn caps_all() -> GuestCaps {
    GuestCaps {
        shm_size: 64 * PAGE,
        shared_objects: true,
        guest_pages: true,
    }
}

impl Dev {
    pub fn new() -> Dev {
        Dev::with(Limits::default(), 2, caps_all())
    }

    pub fn with_limits(limits: Limits) -> Dev {
        Dev::with(limits, 2, caps_all())
    }

    pub fn with(limits: Limits, guests: usize, caps: GuestCaps) -> Dev {
        let provider = MemfdProvider::new(256 << 20);
        let record = provider.record();
        let config = ExporterConfig {
            page_size: PAGE,
            limits,
            fence_timeout: Duration::from_secs(10),
            num_queues: 3,
            host_exports: true,
            allow_memfd_shared_objects: true,
            // The model's rules alone, whatever the host offers.
            host_fences: HostFenceSetting::Off,
        };
        let mut ex = Exporter::new(config, Box::new(provider), guests);
        let mut fe = Vec::new();
        for g in 0..guests {
            let log = Arc::new(Mutex::new(FrontendLog::default()));
            ex.connect(g, caps, Box::new(TestFrontend { log: log.clone() }));
            fe.push(log);
        }
        Dev {
            ex,
            record,
            now: Instant::now(),
            fe,
            next_token: 1,
        }
    }

    /// Submits with tag = token; returns the token and the immediate response.
    pub fn submit(&mut self, guest: usize, req: Request) -> (u64, Option<Response>) {
        self.submit_on(guest, 0, req)
    }

    pub fn submit_on(&mut self, guest: usize, queue: u16, req: Request) -> (u64, Option<Response>) {
        let token = self.next_token;
        self.next_token += 1;
        let r = self
            .ex
            .submit(guest, Origin { queue, token }, token, req, self.now);
        (token, r)
    }

    pub fn call(&mut self, guest: usize, req: Request) -> Response {
        let (_, r) = self.submit(guest, req.clone());
        r.unwrap_or_else(|| panic!("{req:?} parked"))
    }

    pub fn ok(&mut self, guest: usize, req: Request) -> Reply {
        let r = self.call(guest, req.clone());
        r.unwrap_or_else(|s| panic!("{req:?} failed with {s}"))
    }

    pub fn err(&mut self, guest: usize, req: Request) -> Status {
        match self.call(guest, req.clone()) {
            Ok(Reply::MapOverflow { .. }) => Status::Overflow,
            Ok(r) => panic!("{req:?} succeeded: {r:?}"),
            Err(s) => s,
        }
    }

    /// Submits a request that must park; returns its token.
    pub fn park(&mut self, guest: usize, req: Request) -> u64 {
        let (token, r) = self.submit(guest, req.clone());
        assert!(r.is_none(), "{req:?} did not park: {r:?}");
        token
    }

    pub fn completions(&mut self) -> Vec<Completion> {
        self.ex.take_completions()
    }

    /// The response of the parked request `token`, if it completed.
    pub fn completed(&mut self, token: u64) -> Option<Response> {
        self.completions()
            .into_iter()
            .find(|c| c.origin.token == token)
            .map(|c| c.response)
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.ex.tick(self.now);
    }

    // Shorthands for common requests.

    pub fn create(&mut self, guest: usize, pages: u64, dynamic: bool, cache_mapping: bool) -> u64 {
        match self.ok(
            guest,
            Request::Create {
                size: pages * PAGE,
                dynamic,
                cache_mapping,
                guest_pages: None,
            },
        ) {
            Reply::Object(o) => o.object,
            r => panic!("{r:?}"),
        }
    }

    pub fn create_reply(&mut self, guest: usize, pages: u64, dynamic: bool) -> ObjectReply {
        match self.ok(
            guest,
            Request::Create {
                size: pages * PAGE,
                dynamic,
                cache_mapping: false,
                guest_pages: None,
            },
        ) {
            Reply::Object(o) => o,
            r => panic!("{r:?}"),
        }
    }

    pub fn attach(&mut self, guest: usize, object: u64, dynamic_importer: bool) -> u64 {
        self.attach_p2p(guest, object, dynamic_importer, false)
    }

    pub fn attach_p2p(
        &mut self,
        guest: usize,
        object: u64,
        dynamic_importer: bool,
        peer2peer: bool,
    ) -> u64 {
        match self.ok(
            guest,
            Request::Attach {
                object,
                dynamic_importer,
                peer2peer,
            },
        ) {
            Reply::Attachment(a) => a,
            r => panic!("{r:?}"),
        }
    }

    pub fn map_req(attachment: u64, dir: Direction, ctx: u64) -> Request {
        Request::Map {
            attachment,
            dir,
            max_entries: 16,
            ctx,
        }
    }

    pub fn map(&mut self, guest: usize, attachment: u64, dir: Direction, ctx: u64) -> MapReply {
        match self.ok(guest, Dev::map_req(attachment, dir, ctx)) {
            Reply::Map(m) => m,
            r => panic!("{r:?}"),
        }
    }

    /// `UNMAP` with the device taking the lock; must succeed.
    pub fn unmap(&mut self, guest: usize, mapping: u64) {
        self.ok(guest, Request::Unmap { mapping, ctx: 0 });
    }

    pub fn map_shm_req(object: u64, writable: bool) -> Request {
        Request::MapShm { object, writable }
    }

    pub fn signal_req(fence: u64, error: u32) -> Request {
        Request::FenceSignal { fence, error }
    }

    pub fn pin_req(attachment: u64, ctx: u64, pin: bool) -> Request {
        if pin {
            Request::Pin { attachment, ctx }
        } else {
            Request::Unpin { attachment, ctx }
        }
    }

    /// A host eviction with a 1 s lock timeout, as host operation `op`.
    pub fn evict(&mut self, uuid: uuid::Uuid, op: u64) -> Option<Result<(), HostError>> {
        let now = self.now;
        self.ex.host_evict(uuid, op, Duration::from_secs(1), now)
    }

    pub fn ctx(&mut self, guest: usize) -> (u64, u64) {
        match self.ok(guest, Request::AcquireInit) {
            Reply::Acquire { ctx, stamp } => (ctx, stamp),
            r => panic!("{r:?}"),
        }
    }

    pub fn lock_req(ctx: u64, object: u64) -> Request {
        Request::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        }
    }

    pub fn lock(&mut self, guest: usize, ctx: u64, object: u64) {
        self.ok(guest, Dev::lock_req(ctx, object));
    }

    pub fn unlock(&mut self, guest: usize, ctx: u64, object: u64) {
        self.ok(guest, Request::Unlock { ctx, object });
    }

    pub fn fence(&mut self, guest: usize, ctx: u64, object: u64, usage: FenceUsage) -> u64 {
        match self.ok(
            guest,
            Request::FenceAttach {
                ctx,
                object,
                usage,
                host: false,
            },
        ) {
            Reply::Fence(f) => f,
            r => panic!("{r:?}"),
        }
    }

    /// Host sync flags issued since `mark` (a previous `sync_mark`).
    pub fn syncs_since(&self, mark: u64) -> Vec<u64> {
        self.record
            .calls_since(mark)
            .iter()
            .map(|c| c.flags)
            .collect()
    }

    pub fn sync_mark(&self) -> u64 {
        self.record.total()
    }

    /// Objects, attachments and locks left in the model (for leak checks).
    pub fn object_count(&self) -> usize {
        self.ex.list().len()
    }
}
