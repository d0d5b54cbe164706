// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Hooks for the coverage-guided fuzz targets in `fuzz/` (cargo feature
//! `fuzzing`, `docs/fuzzing.md`). Not part of the daemon's interface: each
//! hook drives one real code path of the daemon the way its caller does,
//! and reports what a target needs to check the path's rules.
//!
//! - [`ChainRig`]: a request queue of one connection, served by the real
//!   back-end (`backend/requests/`): chains in, responses and used-ring
//!   entries out, vring stop, disconnect.
//! - [`control_session`]: one control-socket client connection, served by
//!   the real request-line framing and command handling (`control/server/`).
//! - [`relay_stream`]: one direction of the vhost-user relay's message
//!   parser (`backend/relay.rs`) over a byte stream that carries fds.
//! - [`model_counts`], [`open_fds`], [`YesFrontend`]: leak checks and a
//!   front-end for driving the [`Exporter`] directly.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_dmabuf_protocol::{Segment, Status};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;

use crate::backend::guest_memory::{GuestRam, GuestRamHandle};
use crate::backend::{BackendSettings, DmabufBackend, CHANNEL_WAIT};
use crate::exporter::{Exporter, ExporterConfig, Frontend, HostFenceSetting};
use crate::provider::{Backing, MemfdProvider};
use crate::state::DeviceState;

pub use crate::control::{fuzz_session as control_session, Ending};
pub use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};

/// What the model still holds, table by table; all zero once every guest
/// disconnected and every host export was revoked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelCounts {
    pub objects: usize,
    pub attachments: usize,
    pub mappings: usize,
    pub contexts: usize,
    pub fences: usize,
    /// Parked requests, guests' and host operations' together.
    pub pending: usize,
    pub exports: usize,
    pub host_watches: usize,
    /// Handles, attachments, mappings, contexts, fences, window placements
    /// and events still listed under a guest.
    pub per_guest: usize,
    /// Bytes of host memory charged to guests.
    pub guest_bytes: u64,
}

impl ModelCounts {
    pub fn is_empty(&self) -> bool {
        *self == ModelCounts::default()
    }
}

/// The sizes of the model's tables.
pub fn model_counts(ex: &Exporter) -> ModelCounts {
    let mut per_guest = 0;
    let mut guest_bytes = 0u64;
    for g in &ex.guests {
        per_guest += g.handles.len()
            + g.held.len()
            + g.attachments.len()
            + g.mappings.len()
            + g.contexts.len()
            + g.fences.len()
            + g.shm.len()
            + usize::from(!g.events.is_empty())
            + g.parked as usize;
        guest_bytes = guest_bytes.saturating_add(g.bytes);
    }
    ModelCounts {
        objects: ex.objects.len(),
        attachments: ex.attachments.len(),
        mappings: ex.mappings.len(),
        contexts: ex.contexts.len(),
        fences: ex.fences.len(),
        pending: ex.pending.len(),
        exports: ex.exports.len(),
        host_watches: ex.host_watches.len(),
        per_guest,
        guest_bytes,
    }
}

/// How many fds this process has open (`/proc/self/fd`, less the one
/// used to read it).
pub fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// A model for `guests` guests over the real memfd provider, with host
/// exports allowed and no host fence source (the rules of the model alone,
/// whatever the host has), every guest connected through a [`YesFrontend`]
/// with a 64-page shared memory window and shared objects.
pub fn memfd_exporter(guests: usize, limits: crate::exporter::Limits) -> Exporter {
    let config = ExporterConfig {
        page_size: 4096,
        limits,
        fence_timeout: Duration::from_secs(10),
        num_queues: 3,
        host_exports: true,
        allow_memfd_shared_objects: true,
        host_fences: HostFenceSetting::Off,
    };
    let mut ex = Exporter::new(config, Box::new(MemfdProvider::new(1 << 20)), guests);
    for g in 0..guests {
        ex.connect(g, yes_caps(), Box::new(YesFrontend));
    }
    ex
}

/// What [`memfd_exporter`] gives every guest.
pub fn yes_caps() -> crate::exporter::GuestCaps {
    crate::exporter::GuestCaps {
        shm_size: 64 * 4096,
        shared_objects: true,
        guest_pages: true,
    }
}

/// A front-end that does whatever the model asks: window mappings and
/// shared-object publication succeed, guest pages are memfd buffers of the
/// asked size (entries past 1 GiB of guest RAM are `EFAULT`), a lookup
/// finds nothing.
#[derive(Debug, Default)]
pub struct YesFrontend;

impl Frontend for YesFrontend {
    fn shm_map(&mut self, _: u64, _: BorrowedFd<'_>, _: u64, _: bool) -> Result<(), Status> {
        Ok(())
    }
    fn shm_unmap(&mut self, _: u64, _: u64) -> Result<(), Status> {
        Ok(())
    }
    fn shared_object_add(&mut self, _: &[u8; 16]) -> Result<(), Status> {
        Ok(())
    }
    fn shared_object_lookup(&mut self, _: &[u8; 16]) -> Result<OwnedFd, Status> {
        Err(Status::NoEnt)
    }
    fn guest_pages(&mut self, entries: &[Segment]) -> Result<Box<dyn Backing>, Status> {
        const RAM: u64 = 1 << 30;
        let mut size = 0u64;
        for e in entries {
            if e.addr.checked_add(e.len).is_none_or(|end| end > RAM) {
                return Err(Status::Fault);
            }
            size = size.saturating_add(e.len);
        }
        crate::provider::Provider::allocate(&MemfdProvider::new(RAM), size)
            .map_err(|_| Status::NoMem)
    }
}

/// Where a [`ChainRig`]'s ring lives in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    pub desc_table: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub size: u16,
}

/// One connection of guest 0 with one request queue (queue 0) over `mem`,
/// served by the real back-end: the caller lays chains out in `mem` (with
/// virtio-queue's mock queue, say) and kicks the queue; the back-end takes
/// them, runs them through the model and writes the used ring.
pub struct ChainRig {
    state: Arc<DeviceState>,
    backend: DmabufBackend,
    vrings: Vec<VringRwLock>,
}

impl std::fmt::Debug for ChainRig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainRig")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl ChainRig {
    /// A connected guest whose memory table is `mem` and whose queue 0 is
    /// at `ring` (ready, enabled, `EVENT_IDX` as given).
    pub fn new(mem: GuestRam, ring: RingLayout, event_idx: bool) -> io::Result<ChainRig> {
        let ex = memfd_exporter(1, crate::exporter::Limits::default());
        let state = DeviceState::new(ex)?;
        let settings = Arc::new(BackendSettings {
            request_queues: 1,
            worker_per_queue: false,
            max_queue_size: crate::backend::DEFAULT_MAX_QUEUE_SIZE,
            shm_size: 64 * 4096,
            page_size: 4096,
            max_segments: 64,
            udmabuf: None,
            channel_wait: CHANNEL_WAIT,
        });
        let backend = DmabufBackend::new(0, Arc::clone(&state), settings, Arc::default());
        let handle = GuestRamHandle::new(mem);
        backend.update_memory(handle.clone())?;
        {
            let mut ex = state.lock();
            ex.connect(0, backend.caps(), backend.frontend());
        }
        let max = crate::backend::DEFAULT_MAX_QUEUE_SIZE;
        let vring_err = |e| io::Error::other(format!("vring: {e:?}"));
        let vrings = (0..backend.num_queues())
            .map(|_| VringRwLock::new(handle.clone(), max).map_err(vring_err))
            .collect::<io::Result<Vec<_>>>()?;
        let q = &vrings[0];
        q.set_queue_size(ring.size);
        q.set_queue_info(ring.desc_table.0, ring.avail.0, ring.used.0)
            .map_err(vring_err)?;
        q.set_queue_event_idx(event_idx);
        q.set_queue_ready(true);
        q.set_enabled(true);
        Ok(ChainRig {
            state,
            backend,
            vrings,
        })
    }

    /// The queue's kick: the worker serves every available chain.
    pub fn kick(&self) -> io::Result<()> {
        self.backend.handle_event(0, EventSet::IN, &self.vrings, 0)
    }

    /// Fires the model's timers as if `after` had passed, then lets the
    /// worker deliver what completed (the timer thread's and the wake-up
    /// eventfd's part).
    pub fn fire_timers(&self, after: Duration) -> io::Result<()> {
        {
            let mut ex = self.state.lock();
            ex.tick(Instant::now() + after);
            self.state.changed(&ex);
        }
        let wake = self.backend.wake_event();
        self.backend
            .handle_event(wake, EventSet::IN, &self.vrings, 0)
    }

    /// `GET_VRING_BASE` of queue 0: every chain still held comes back.
    pub fn stop(&self) -> io::Result<()> {
        self.vrings[0].set_queue_ready(false);
        self.backend.stop_vring(0)
    }

    /// Chains taken from the avail ring and not yet on the used ring.
    pub fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }

    /// The front-end hangs up: everything the guest held is released.
    /// Returns what the model still holds afterwards.
    pub fn disconnect(self) -> ModelCounts {
        self.backend.connection_ended();
        self.backend.disconnected();
        let ex = self.state.lock();
        model_counts(&ex)
    }
}

/// What [`relay_stream`] saw.
#[derive(Debug)]
pub struct RelayOutcome {
    /// How the relay's reading ended: `Ok` at a clean end between messages.
    pub result: io::Result<()>,
    /// The bytes the back-end side received.
    pub forwarded: Vec<u8>,
    /// The fds the back-end side received.
    pub forwarded_fds: usize,
    /// Messages the relay counted.
    pub messages: u64,
    /// The acked protocol features it recorded.
    pub acked_protocol_features: u64,
    /// Whether it kept a back-end channel socket.
    pub channel_socket: bool,
}

/// The protocol feature bits the relay records of `raw` (those it knows).
pub fn known_protocol_features(raw: u64) -> u64 {
    vhost::vhost_user::message::VhostUserProtocolFeatures::from_bits_truncate(raw).bits()
}

/// Longest stream [`relay_stream`] takes (it keeps an input's run short).
pub const RELAY_STREAM_MAX: usize = 64 << 10;

/// Sends `segments` (bytes, and how many fds go with them: each an eventfd)
/// as the front-end, then hangs up, and runs the relay's front-end to
/// back-end direction over them on this thread. The front-end writes and
/// the back-end reads on threads of their own, as in the daemon: neither
/// socket buffer has to hold the whole stream (many small segments or
/// messages take far more buffer than their bytes).
pub fn relay_stream(segments: &[(&[u8], usize)]) -> io::Result<RelayOutcome> {
    let total: usize = segments.iter().map(|(b, _)| b.len()).sum();
    if total > RELAY_STREAM_MAX {
        return Err(io::Error::other("stream too long"));
    }
    let (front_peer, front) = UnixStream::pair()?;
    let (back, mut back_peer) = UnixStream::pair()?;
    let info = crate::backend::relay::ConnectionInfo::default();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<()> {
            for (bytes, nfds) in segments {
                if bytes.is_empty() {
                    continue;
                }
                let fds = (0..(*nfds).min(MAX_ATTACHED_FD_ENTRIES))
                    .map(|_| rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC))
                    .collect::<Result<Vec<_>, _>>()?;
                send_all(&front_peer, bytes, &fds)?;
            }
            front_peer.shutdown(Shutdown::Write)
        });
        let reader = scope.spawn(move || receive_all(&mut back_peer));
        let result = crate::backend::relay::carry_messages(&front, &back, Some(&info), "fuzz");
        back.shutdown(Shutdown::Write)?;
        // A relay that stopped reading early leaves the writer blocked on
        // a full buffer: closing the socket ends its write (EPIPE, or
        // ECONNRESET when bytes were left unread).
        drop(front);
        let stopped_early = |e: &io::Error| {
            result.is_err()
                && matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                )
        };
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if stopped_early(&e) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("the writer thread panicked")),
        }
        let (forwarded, forwarded_fds) = reader
            .join()
            .map_err(|_| io::Error::other("the reader thread panicked"))??;
        Ok(RelayOutcome {
            result,
            forwarded,
            forwarded_fds,
            messages: info.messages(),
            acked_protocol_features: info.acked_protocol_features().bits(),
            channel_socket: info.take_channel_socket().is_some(),
        })
    })
}

/// Writes `bytes` with `fds` attached to the first `sendmsg`.
pub(crate) fn send_all(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("too many fds"));
    }
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let n = if sent == 0 {
            sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            sendmsg(
                sock,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        };
        match n {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads `sock` to its end; returns the bytes and how many fds came (each
/// closed at once).
fn receive_all(sock: &mut UnixStream) -> io::Result<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut fds = 0;
    loop {
        let mut buf = [0u8; 8192];
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match recvmsg(
            &*sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds += received.count();
            }
        }
        if msg.bytes == 0 {
            return Ok((out, fds));
        }
        out.extend_from_slice(&buf[..msg.bytes]);
    }
}

/// Reads what is there without waiting (the socket stays blocking).
pub(crate) fn read_available(sock: &UnixStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = [0u8; 16 << 10];
    loop {
        match rustix::net::recv(sock, &mut buf, RecvFlags::DONTWAIT) {
            Ok((0, _)) => return Ok(()),
            Ok((n, _)) => out.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::AGAIN) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
