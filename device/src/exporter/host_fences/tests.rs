// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host-fence rules against real kernel objects (vgem, sync_file);
//! a test that needs a vgem card skips where the host has none.

use super::*;
use crate::exporter::{ExportSpec, ExporterConfig, GuestCaps, NoFrontend, Origin};
use crate::provider::{
    find_vgem_card, import_dmabuf, poll_now, FenceSource, MemfdProvider, TestGpuBuffer,
};
use std::os::fd::{AsFd, BorrowedFd};
use virtio_dmabuf_protocol::{caps, Direction, Reply, Request, Response, Status};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A model with the host's vgem fence source and a vgem GPU buffer of
/// the test's own, exported as `gpu`; `None` (with the skip printed:
/// the kernel lane fails on it) where there is no vgem card.
struct Host {
    ex: Exporter,
    gpu: TestGpuBuffer,
    next: u64,
    /// Completions taken from the model and not yet asked for.
    done: Vec<crate::exporter::Completion>,
}

impl Host {
    fn new(test: &str) -> Option<Host> {
        let gpu = match TestGpuBuffer::new() {
            Ok(g) => g,
            Err(why) => {
                println!("{test} skipped: a vgem card does not exist on this host ({why})");
                return None;
            }
        };
        let config = ExporterConfig {
            host_exports: true,
            fence_timeout: TIMEOUT,
            host_fences: HostFenceSetting::Off,
            ..ExporterConfig::default()
        };
        let mut ex = Exporter::new(config, Box::new(MemfdProvider::new(1 << 20)), 1);
        ex.connect(0, GuestCaps::default(), Box::new(NoFrontend));
        let card = find_vgem_card().expect("vgem card");
        ex.set_host_fence_source(Some(FenceSource::vgem(&card).expect("vgem source")));
        let backing =
            import_dmabuf(gpu.dmabuf.try_clone().expect("dup")).expect("import the dma-buf");
        let spec = ExportSpec {
            name: "gpu".into(),
            dynamic: false,
            read_only: false,
            guests: None,
        };
        ex.host_export(spec, backing).expect("export");
        Some(Host {
            ex,
            gpu,
            next: 1,
            done: Vec::new(),
        })
    }

    fn dmabuf(&self) -> BorrowedFd<'_> {
        self.gpu.dmabuf.as_fd()
    }

    /// Submits a request: `Some` answered now, `None` parked.
    fn submit(&mut self, req: Request) -> (u64, Option<Response>) {
        let token = self.next;
        self.next += 1;
        let origin = Origin { queue: 0, token };
        (token, self.ex.submit(0, origin, token, req, Instant::now()))
    }

    fn ok(&mut self, req: Request) -> Reply {
        match self.submit(req) {
            (_, Some(Ok(r))) => r,
            (_, r) => panic!("{r:?}"),
        }
    }

    fn open(&mut self) -> u64 {
        match self.ok(Request::Open {
            uuid: None,
            name: b"gpu".to_vec(),
        }) {
            Reply::Object(o) => o.object,
            r => panic!("{r:?}"),
        }
    }

    /// A context holding the object's lock.
    fn locked(&mut self, object: u64) -> u64 {
        let ctx = match self.ok(Request::AcquireInit) {
            Reply::Acquire { ctx, .. } => ctx,
            r => panic!("{r:?}"),
        };
        let lock = Request::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        };
        assert_eq!(self.ok(lock), Reply::Empty);
        ctx
    }

    fn fence(&mut self, ctx: u64, object: u64, usage: FenceUsage, host: bool) -> Response {
        let req = Request::FenceAttach {
            ctx,
            object,
            usage,
            host,
        };
        self.submit(req).1.expect("FENCE_ATTACH never parks")
    }

    /// Plays the timer thread: polls the watches until `token`
    /// completes, at most `within`.
    fn until_done(&mut self, token: u64, within: Duration) -> Response {
        let end = Instant::now() + within;
        loop {
            self.done.extend(self.ex.take_completions_for(0));
            if let Some(i) = self.done.iter().position(|c| c.origin.token == token) {
                return self.done.remove(i).response;
            }
            assert!(Instant::now() < end, "request {token} still parked");
            let ready: Vec<u64> = self
                .ex
                .host_watches()
                .into_iter()
                .filter(|(_, fd, events)| poll_now(fd.as_fd(), *events).expect("poll"))
                .map(|(id, _, _)| id)
                .collect();
            self.ex.host_watches_ready(&ready, Instant::now());
            self.ex.tick(Instant::now());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn still_parked(&mut self, token: u64) {
        std::thread::sleep(Duration::from_millis(30));
        let ready: Vec<u64> = self
            .ex
            .host_watches()
            .into_iter()
            .filter(|(_, fd, events)| poll_now(fd.as_fd(), *events).expect("poll"))
            .map(|(id, _, _)| id)
            .collect();
        assert!(
            ready.is_empty(),
            "a watch is readable with the fence pending"
        );
        self.ex.tick(Instant::now());
        self.done.extend(self.ex.take_completions_for(0));
        assert!(
            self.done.iter().all(|c| c.origin.token != token),
            "request {token} completed: {:?}",
            self.done
        );
    }
}

fn begin(object: u64, dir: Direction) -> Request {
    Request::BeginCpuAccess { object, dir }
}

#[test]
fn host_fences_without_a_source_or_a_kernel_dmabuf_are_eopnotsupp() {
    let config = ExporterConfig {
        host_fences: HostFenceSetting::Off,
        ..ExporterConfig::default()
    };
    let mut ex = Exporter::new(config, Box::new(MemfdProvider::new(1 << 20)), 1);
    ex.connect(0, GuestCaps::default(), Box::new(NoFrontend));
    let origin = Origin { queue: 0, token: 1 };
    let now = Instant::now();
    let create = Request::Create {
        size: crate::exporter::page_size(),
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    let Some(Ok(Reply::Object(o))) = ex.submit(0, origin, 1, create, now) else {
        panic!("create");
    };
    let Some(Ok(Reply::Acquire { ctx, .. })) = ex.submit(0, origin, 2, Request::AcquireInit, now)
    else {
        panic!("acquire");
    };
    let info = ex.submit(0, origin, 3, Request::GetInfo, now);
    let Some(Ok(Reply::Info(info))) = info else {
        panic!("{info:?}");
    };
    assert_eq!(info.caps & caps::HOST_FENCES, 0, "no source, no capability");
    // Refused before the lock check (EPERM otherwise): no source here,
    // and a memfd object has no host reservation anyway.
    let fence = |host| Request::FenceAttach {
        ctx,
        object: o.object,
        usage: FenceUsage::Write,
        host,
    };
    assert_eq!(
        ex.submit(0, origin, 4, fence(true), now),
        Some(Err(Status::NotSupported))
    );
    assert_eq!(
        ex.submit(0, origin, 5, fence(false), now),
        Some(Err(Status::Perm)),
        "without HOST the answer is what it always was"
    );
}

#[test]
fn guest_write_fence_makes_a_host_poll_wait_until_it_is_signalled() {
    let Some(mut h) = Host::new("guest fence to host") else {
        return;
    };
    let info = h.ok(Request::GetInfo);
    let Reply::Info(info) = info else {
        panic!("{info:?}");
    };
    assert_ne!(info.caps & caps::HOST_FENCES, 0);
    let o = h.open();
    let ctx = h.locked(o);
    let Ok(Reply::Fence(w)) = h.fence(ctx, o, FenceUsage::Write, true) else {
        panic!("FENCE_ATTACH(WRITE, HOST)");
    };
    // A host reader and a host writer both wait for the guest's write.
    assert!(!poll_now(h.dmabuf(), PollFlags::IN).expect("poll"));
    assert!(!poll_now(h.dmabuf(), PollFlags::OUT).expect("poll"));
    let seen = crate::provider::export_sync_file(h.dmabuf(), HostAccess::Read).expect("export");
    assert_eq!(
        h.ok(Request::FenceSignal { fence: w, error: 0 }),
        Reply::Empty
    );
    assert!(poll_now(h.dmabuf(), PollFlags::IN).expect("poll"));
    assert!(seen.is_signalled().expect("poll"));
    // A READ fence holds host writers only; an error signal still
    // releases them (vgem carries no error: counted as dropped).
    let Ok(Reply::Fence(r)) = h.fence(ctx, o, FenceUsage::Read, false) else {
        panic!("FENCE_ATTACH(READ)");
    };
    assert!(poll_now(h.dmabuf(), PollFlags::IN).expect("poll"));
    assert!(!poll_now(h.dmabuf(), PollFlags::OUT).expect("poll"));
    assert_eq!(
        h.ok(Request::FenceSignal { fence: r, error: 5 }),
        Reply::Empty
    );
    assert!(poll_now(h.dmabuf(), PollFlags::OUT).expect("poll"));
    let stats = h.ex.host_fence_stats();
    assert_eq!(stats.source, Some("vgem"));
    assert_eq!(
        (
            stats.installed,
            stats.signalled,
            stats.errors_dropped,
            stats.pending
        ),
        (2, 2, 1, 0)
    );
    // BOOKKEEP has no host counterpart; with HOST the parser refuses
    // it, without HOST it stays in the model.
    let Ok(Reply::Fence(b)) = h.fence(ctx, o, FenceUsage::Bookkeep, false) else {
        panic!("FENCE_ATTACH(BOOKKEEP)");
    };
    assert!(poll_now(h.dmabuf(), PollFlags::OUT).expect("poll"));
    assert_eq!(
        h.ok(Request::FenceSignal { fence: b, error: 0 }),
        Reply::Empty
    );
    assert_eq!(h.ex.host_fence_stats().installed, 2);
}

#[test]
fn a_host_write_fence_parks_cpu_access_and_wait_until_the_host_signals_it() {
    let Some(mut h) = Host::new("host fence to guest") else {
        return;
    };
    let o = h.open();
    // The GPU's own fence on its own buffer.
    let f = h.gpu.direct_fence(true);
    let (reader, r) = h.submit(begin(o, Direction::FromDevice));
    assert_eq!(r, None, "BEGIN_CPU_ACCESS(FROM_DEVICE) parks");
    let wait = Request::Wait {
        object: o,
        usage: FenceUsage::Write,
        timeout_ns: 3_000_000_000,
    };
    let (waiter, r) = h.submit(wait);
    assert_eq!(r, None, "WAIT(WRITE) parks");
    let poll = Request::Wait {
        object: o,
        usage: FenceUsage::Write,
        timeout_ns: 0,
    };
    assert_eq!(
        h.submit(poll).1,
        Some(Err(Status::TimedOut)),
        "WAIT 0 polls"
    );
    assert_eq!(h.ex.host_watches().len(), 2);
    h.still_parked(reader);
    h.gpu.signal(f);
    assert_eq!(h.until_done(reader, TIMEOUT), Ok(Reply::Empty));
    assert_eq!(h.until_done(waiter, TIMEOUT), Ok(Reply::Empty));
    assert!(h.ex.host_watches().is_empty(), "no watch left behind");
    let end = Request::EndCpuAccess {
        object: o,
        dir: Direction::FromDevice,
    };
    assert_eq!(h.ok(end), Reply::Empty);
    // A host READ fence holds a CPU writer, not a reader.
    let f = h.gpu.fence(false);
    assert_eq!(
        h.submit(begin(o, Direction::FromDevice)).1,
        Some(Ok(Reply::Empty))
    );
    let (writer, r) = h.submit(begin(o, Direction::ToDevice));
    assert_eq!(r, None, "BEGIN_CPU_ACCESS(TO_DEVICE) parks");
    h.gpu.signal(f);
    assert_eq!(h.until_done(writer, TIMEOUT), Ok(Reply::Empty));
    assert_eq!(h.ex.host_fence_stats().waits, 3);
}

#[test]
fn a_host_fence_wait_is_bounded_by_the_fence_timeout() {
    let Some(mut h) = Host::new("host fence timeout") else {
        return;
    };
    let o = h.open();
    let f = h.gpu.fence(true);
    let start = Instant::now();
    let (reader, r) = h.submit(begin(o, Direction::FromDevice));
    assert_eq!(r, None);
    // The timer fires at --fence-timeout (5 s here) after the wait began.
    let due = h.ex.next_deadline().expect("a deadline");
    assert!(
        due >= start + TIMEOUT && due <= Instant::now() + TIMEOUT,
        "{due:?}"
    );
    h.ex.tick(due);
    let done = h.ex.take_completions_for(0);
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].origin.token, &done[0].response),
        (reader, &Err(Status::TimedOut))
    );
    assert!(h.ex.host_watches().is_empty());
    assert_eq!(h.ex.host_fence_stats().wait_timeouts, 1);
    h.gpu.signal(f);
}

#[test]
fn a_static_map_waits_for_host_writers_but_not_for_its_own_guest_fence() {
    let Some(mut h) = Host::new("static map and host fences") else {
        return;
    };
    let o = h.open();
    let a = match h.ok(Request::Attach {
        object: o,
        dynamic_importer: false,
        peer2peer: false,
    }) {
        Reply::Attachment(a) => a,
        r => panic!("{r:?}"),
    };
    let map = Request::Map {
        attachment: a,
        dir: Direction::ToDevice,
        max_entries: 4,
        ctx: 0,
    };
    let mapping = |r: Response| match r {
        Ok(Reply::Map(m)) => m.mapping,
        r => panic!("MAP: {r:?}"),
    };
    // The guest's own WRITE fence, installed on the host, is no KERNEL
    // fence: a static importer's MAP goes on.
    let ctx = h.locked(o);
    let Ok(Reply::Fence(w)) = h.fence(ctx, o, FenceUsage::Write, true) else {
        panic!("FENCE_ATTACH");
    };
    assert_eq!(h.ok(Request::Unlock { ctx, object: o }), Reply::Empty);
    let first = mapping(h.submit(map.clone()).1.expect("MAP answers at once"));
    // The host's writer (which user space cannot tell from a KERNEL
    // fence) makes it wait, holding the lock, even beside the guest's
    // own fence, which it still does not wait for.
    let f = h.gpu.fence(true);
    let (parked, r) = h.submit(map.clone());
    assert_eq!(r, None, "MAP parks on the host's fence");
    h.still_parked(parked);
    h.gpu.signal(f);
    let second = mapping(h.until_done(parked, TIMEOUT));
    assert_eq!(
        h.ok(Request::FenceSignal { fence: w, error: 0 }),
        Reply::Empty
    );
    // An UNMAP's START sync would wait in the kernel: it parks instead.
    let f = h.gpu.fence(true);
    let (unmapping, r) = h.submit(Request::Unmap {
        mapping: first,
        ctx: 0,
    });
    assert_eq!(r, None, "UNMAP waits for the host's writer");
    h.still_parked(unmapping);
    h.gpu.signal(f);
    assert_eq!(h.until_done(unmapping, TIMEOUT), Ok(Reply::Empty));
    let unmap = Request::Unmap {
        mapping: second,
        ctx: 0,
    };
    assert_eq!(h.ok(unmap), Reply::Empty);
    assert!(h.ex.host_watches().is_empty());
}
