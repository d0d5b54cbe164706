// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user back-end of one connection: a [`VhostUserBackend`] that
//! turns descriptor chains into typed requests for the model and writes
//! the responses back (contract sections 1 to 4, 6 and 8).
//!
//! - this file: features, config space, the vhost-user hooks (memory table,
//!   back-end channel, vring stop, device reset, shared objects)
//! - `requests/`: the request queues, the chains in flight (returned
//!   exactly once, also across vring stops and resets), completions
//! - `events.rs`: the eventq
//! - `channel.rs`: the back-end channel (messages to the front-end)
//! - `relay.rs`: the message relay that sees acked protocol features and
//!   the back-end channel socket
//! - `listener.rs`: one guest socket's listener thread, a connection at a
//!   time
//! - `vhost_frontend.rs`: what the model asks of a front-end, over
//!   vhost-user (the exporter's `Frontend`)
//! - `guest_memory.rs`: guest RAM pages as object backing
//!
//! One [`DmabufBackend`] serves one front-end connection of one guest (the
//! daemon builds a fresh one, with a fresh `VhostUserDaemon`, for every
//! connection). All guests share the model through [`DeviceState`].

pub mod channel;
mod events;
pub mod guest_memory;
pub(crate) mod listener;
pub mod relay;
mod requests;
pub mod vhost_frontend;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use virtio_dmabuf_protocol::EVENTQ;

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_dmabuf_protocol::Config as ConfigSpace;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::exporter::{Frontend, GuestCaps, GuestId};
use crate::provider::UdmabufProvider;
use crate::state::lock_order::{Ordered, Rank};
use crate::state::DeviceState;
use guest_memory::{overlaps, region_keys, removed_regions, GuestRamHandle, RegionKey};

use channel::Channel;
use relay::ConnectionInfo;
use requests::{Chains, Tally};
use vhost_frontend::{Link, VhostFrontend};

/// Largest `TRANSFER_TO_HOST`/`TRANSFER_FROM_HOST` length a chain may carry
/// (section 7.5 leaves the bound to the device): 16 MiB. Longer is `EINVAL`;
/// a guest copies more in several requests, or maps the object.
pub const TRANSFER_MAX: u64 = 16 << 20;

/// Default (and largest) ring size offered to the front-end.
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 1024;

/// How long a vring worker waits for the front-end to act on the back-end
/// channel messages of one request before it answers the guest anyway.
pub const CHANNEL_WAIT: Duration = Duration::from_secs(15);

/// The virtio features offered (section 1).
pub const VIRTIO_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The vhost-user protocol features offered (section 1); `SHMEM` only with
/// a window (`--shm-size` above 0).
pub fn protocol_features(shm_size: u64) -> VhostUserProtocolFeatures {
    let mut f = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::SHARED_OBJECT;
    if shm_size > 0 {
        f |= VhostUserProtocolFeatures::SHMEM;
    }
    f
}

/// What every connection of the daemon is configured with.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Request queues (`--queues`): the device has this many plus the eventq.
    pub request_queues: u16,
    /// A vring worker per request queue past the first (`worker_queues`).
    pub worker_per_queue: bool,
    /// Largest ring size the front-end may set (a power of two).
    pub max_queue_size: u16,
    /// Size of shared memory region 0 (`--shm-size`); 0: no `SHMEM`.
    pub shm_size: u64,
    /// `config.page_size` (section 3).
    pub page_size: u32,
    /// `config.max_segments` (section 3).
    pub max_segments: u32,
    /// `/dev/udmabuf`, when the host has it: guest pages become dma-bufs.
    pub udmabuf: Option<Arc<UdmabufProvider>>,
    /// How long a worker waits for the front-end on the back-end channel.
    pub channel_wait: Duration,
}

impl BackendSettings {
    /// Every queue, eventq included (`config.num_queues`).
    pub fn num_queues(&self) -> usize {
        usize::from(self.request_queues) + 1
    }
}

/// A leaf of the daemon's lock order (`state.rs`, `# Locking`).
fn locked<T>(m: &Mutex<T>) -> Ordered<'_, T> {
    Ordered::new(m.lock().unwrap_or_else(PoisonError::into_inner), Rank::Leaf)
}

/// The back-end of one front-end connection for guest `guest`.
pub struct DmabufBackend {
    guest: GuestId,
    state: Arc<DeviceState>,
    settings: Arc<BackendSettings>,
    link: Arc<Link>,
    /// What the relay saw: acked protocol features, the channel socket.
    info: Arc<ConnectionInfo>,
    /// The vrings by queue index, as each worker's first `handle_event`
    /// showed them (a worker sees only its own; the vring stop hook and the
    /// delivery of completions need any of them to return chains).
    vrings: Mutex<Vec<Option<VringRwLock>>>,
    /// The queues whose vring is in `vrings`, a bit each.
    vrings_known: AtomicU64,
    /// The queues of each vring worker ([`worker_queues`]).
    workers: Vec<u64>,
    /// Every chain off the avail ring and not yet on the used ring; rings
    /// are written only with it locked (see `requests.rs`).
    chains: Mutex<Chains>,
    /// The memory table as last seen, to tell which regions went away.
    regions: Mutex<Vec<RegionKey>>,
    /// Exit eventfds handed to the vring workers (closed after they stop).
    exit_consumers: Mutex<Vec<RawFd>>,
    /// What the connection's requests came to (logged at disconnect).
    tally: Tally,
}

impl std::fmt::Debug for DmabufBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmabufBackend")
            .field("guest", &self.guest)
            .field("settings", &self.settings)
            .field("link", &self.link)
            .field("in_flight", &locked(&self.chains).len())
            .finish_non_exhaustive()
    }
}

/// The queues of each vring worker, as vhost-user-backend's masks. One
/// worker serves every queue and the guest's wake-ups, unless `per_queue`:
/// then the first serves controlq, the event queue and the wake-ups (the
/// daemon registers the wake-up eventfd with it alone), and every further
/// request queue has a worker of its own, so a guest's request queues are
/// served in parallel (up to the model lock every request takes).
fn worker_queues(num_queues: usize, per_queue: bool) -> Vec<u64> {
    let all = if num_queues >= 64 {
        u64::MAX
    } else {
        (1u64 << num_queues) - 1
    };
    if !per_queue {
        return vec![all];
    }
    let first = usize::from(EVENTQ) + 1;
    let mut masks = vec![(1u64 << first.min(num_queues)) - 1];
    masks.extend((first..num_queues.min(64)).map(|q| 1u64 << q));
    masks
}

/// The queue behind a worker's `device_event`: vhost-user-backend numbers
/// each worker's vrings from 0, in queue order within its mask.
fn queue_of(workers: &[u64], thread_id: usize, event: usize) -> Option<u16> {
    let mut mask = *workers.get(thread_id)?;
    for _ in 0..event {
        mask &= mask.checked_sub(1)?;
    }
    (mask != 0).then(|| mask.trailing_zeros() as u16)
}

impl DmabufBackend {
    pub fn new(
        guest: GuestId,
        state: Arc<DeviceState>,
        settings: Arc<BackendSettings>,
        info: Arc<ConnectionInfo>,
    ) -> Self {
        let workers = worker_queues(settings.num_queues(), settings.worker_per_queue);
        DmabufBackend {
            guest,
            state,
            link: Arc::new(Link::new(settings.udmabuf.clone())),
            settings,
            info,
            vrings: Mutex::new(Vec::new()),
            vrings_known: AtomicU64::new(0),
            workers,
            chains: Mutex::new(Chains::default()),
            regions: Mutex::new(Vec::new()),
            exit_consumers: Mutex::new(Vec::new()),
            tally: Tally::default(),
        }
    }

    /// The connection in a few words, for the line logged when it ends:
    /// requests taken from the queues, those a quota refused, vhost-user
    /// messages from the front-end and, with debug logging, every answer
    /// by opcode and status.
    pub fn summary(&self) -> String {
        format!(
            "{}, {} vhost-user messages",
            self.tally.summary(locked(&self.chains).taken()),
            self.info.messages()
        )
    }

    pub fn guest(&self) -> GuestId {
        self.guest
    }

    /// The device event id of the guest's wake-up eventfd (registered with
    /// the vring worker): past the queues and vhost-user-backend's own id.
    pub fn wake_event(&self) -> u16 {
        // At most 64 queues, so this fits.
        u16::try_from(self.settings.num_queues() + 1).unwrap_or(u16::MAX)
    }

    /// A [`Frontend`] for the model, over this connection.
    pub fn frontend(&self) -> Box<dyn Frontend> {
        Box::new(VhostFrontend::new(self.guest, Arc::clone(&self.link)))
    }

    /// What is live on this connection (section 7.1 `GET_INFO` caps).
    pub fn caps(&self) -> GuestCaps {
        let channel = self.link.channel().is_some_and(|c| !c.is_closed());
        let acked = self.info.acked_protocol_features();
        GuestCaps {
            shm_size: if channel && acked.contains(VhostUserProtocolFeatures::SHMEM) {
                self.settings.shm_size
            } else {
                0
            },
            shared_objects: channel && acked.contains(VhostUserProtocolFeatures::SHARED_OBJECT),
            guest_pages: !locked(&self.regions).is_empty(),
        }
    }

    fn update_caps(&self) {
        let caps = self.caps();
        let mut ex = self.state.lock();
        ex.set_caps(self.guest, caps);
        self.state.changed(&ex);
    }

    /// The front-end went away (or the daemon stops): the back-end channel
    /// closes, so no worker keeps waiting on it. Call before the
    /// connection's `VhostUserDaemon` is dropped (which joins the workers).
    pub fn connection_ended(&self) {
        self.link.mark_gone();
    }

    /// After the connection's workers stopped: everything the guest held is
    /// released (section 6) and this back-end's leftovers are dropped.
    pub fn disconnected(&self) {
        self.link.mark_gone();
        {
            let mut ex = self.state.lock();
            ex.disconnect(self.guest, Instant::now());
            // Nobody is left to return these chains to.
            let dropped = ex.take_completions_for(self.guest).len();
            if dropped > 0 {
                log::debug!("guest {}: {dropped} completions dropped", self.guest);
            }
            self.state.changed(&ex);
        }
        locked(&self.chains).clear();
        locked(&self.vrings).clear();
        self.vrings_known.store(0, Ordering::Release);
        self.close_exit_events();
    }

    /// Closes the exit eventfds handed to the vring workers. vhost-user-backend
    /// registers them with `into_raw_fd` and never closes them; call this
    /// only once the `VhostUserDaemon` (and so its workers) is gone.
    fn close_exit_events(&self) {
        for fd in locked(&self.exit_consumers).drain(..) {
            // SAFETY: `fd` came from an `EventConsumer` we created in
            // `exit_event`; vhost-user-backend took it with `into_raw_fd`,
            // registered it with its epoll and never closes it. Its workers
            // are joined (the daemon was dropped), so nothing uses the
            // number any more and we are its only owner.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            num_queues: u32::try_from(self.settings.num_queues()).unwrap_or(u32::MAX),
            page_size: self.settings.page_size,
            shm_size: self.caps().shm_size,
            max_segments: self.settings.max_segments,
        }
    }

    fn memory(&self) -> Option<GuestRamHandle> {
        self.link.memory()
    }

    /// Chains taken from the request queues and not yet returned.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn in_flight(&self) -> usize {
        self.chains().len()
    }
}

impl VhostUserBackend for DmabufBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.settings.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.max_queue_size)
    }

    fn features(&self) -> u64 {
        VIRTIO_FEATURES
    }

    fn acked_features(&self, features: u64) {
        log::debug!("guest {}: virtio features acked {features:#x}", self.guest);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features(self.settings.shm_size)
    }

    /// `RESET_DEVICE` (section 6): everything the guest held is released;
    /// the connection, its memory table and its back-end channel stay.
    /// vhost-user-backend disabled every ring before this call.
    fn reset_device(&self) {
        self.reset_rings(self.caps());
        log::info!("guest {}: device reset", self.guest);
    }

    fn set_event_idx(&self, enabled: bool) {
        // vhost-user-backend sets it on the queues; the drain loop and the
        // signal decisions go through them.
        log::debug!("guest {}: EVENT_IDX {enabled}", self.guest);
    }

    /// Section 3: always `size` bytes (zero past the structure), nothing for
    /// an offset/size that overflows or is absurd.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // Section 3: writes are ignored.
        Ok(())
    }

    /// A new memory table (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`).
    /// Guest-placed objects over a region that is gone are revoked before
    /// the front-end gets its answer (section 10).
    fn update_memory(&self, mem: GuestRamHandle) -> std::io::Result<()> {
        self.link.set_memory(mem.clone());
        let keys = region_keys(&mem.memory());
        let removed = {
            let mut regions = locked(&self.regions);
            let removed = removed_regions(&regions, &keys);
            *regions = keys;
            removed
        };
        let caps = self.caps();
        let mut ex = self.state.lock();
        if !removed.is_empty() {
            let n = ex.revoke_guest_pages(
                self.guest,
                |gpa, len| overlaps(&removed, gpa, len),
                Instant::now(),
            );
            if n > 0 {
                log::info!(
                    "guest {}: {n} guest-placed objects revoked (memory region removed)",
                    self.guest
                );
            }
        }
        ex.set_caps(self.guest, caps);
        self.state.changed(&ex);
        Ok(())
    }

    /// The back-end channel arrived. vhost-user-backend wraps it in a
    /// `vhost::Backend`, which cannot do `SHARED_OBJECT_LOOKUP`; the relay
    /// kept the socket, and this back-end speaks the channel itself.
    fn set_backend_req_fd(&self, backend: Backend) {
        drop(backend);
        let acked = self.info.acked_protocol_features();
        match self.info.take_channel_socket() {
            Some(sock) => {
                let name = format!("dmabuf-chan{}", self.guest);
                let reply_ack = acked.contains(VhostUserProtocolFeatures::REPLY_ACK);
                match Channel::start(sock, reply_ack, &name) {
                    Ok(channel) => {
                        if let Some(old) = self.link.set_channel(Some(channel)) {
                            old.close();
                        }
                    }
                    Err(e) => log::error!("guest {}: back-end channel thread: {e}", self.guest),
                }
            }
            None => log::error!(
                "guest {}: SET_BACKEND_REQ_FD without a socket; no back-end channel",
                self.guest
            ),
        }
        log::debug!(
            "guest {}: back-end channel (protocol features {:#x})",
            self.guest,
            acked.bits()
        );
        self.update_caps();
    }

    /// `GET_SHARED_OBJECT` (41): the fd of an object this guest published
    /// with `EXPORT_UUID` (section 7.2). Never waits for the front-end.
    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> std::io::Result<File> {
        let uuid = *uuid.uuid.as_bytes();
        let fd = self.state.lock().shared_object_fd(self.guest, &uuid);
        fd.map(File::from).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no object {} published by this guest",
                    uuid::Uuid::from_bytes(uuid)
                ),
            )
        })
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.workers.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                use std::os::fd::AsRawFd;
                locked(&self.exit_consumers).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                log::error!("guest {}: exit eventfd: {e}", self.guest);
                None
            }
        }
    }

    /// `GET_VRING_BASE` (section 6): the ring's waiting chains complete with
    /// `ECANCELED` now, so the front-end has them back before its answer;
    /// the guest's state stays.
    /// vhost-user-backend marked the queue not ready before this call, so
    /// no chain leaves its avail ring after it.
    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Ok(queue) = u16::try_from(queue_index) {
            self.stop_ring(queue);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.remember_vrings(thread_id, vrings);
        let event = usize::from(device_event);
        let queue = vrings
            .get(event)
            .and_then(|vring| Some((queue_of(&self.workers, thread_id, event)?, vring)));
        if device_event == self.wake_event() {
            if let Some(wake) = self.state.guest_wake(self.guest) {
                // Drains the counter; a spurious wake-up only costs a look.
                let _ = wake.read();
            }
        } else if let Some((queue, vring)) = queue.filter(|(q, _)| *q != EVENTQ) {
            // Whatever these requests completed or raised for this guest
            // wrote its wake-up eventfd (`DeviceState::changed`), which
            // brings the first worker back for it: nothing more to look at.
            self.serve_queue(queue, vring);
            return Ok(());
        }
        self.deliver_completions();
        self.deliver_events();
        Ok(())
    }

    /// `GET_SHMEM_CONFIG` (44): one region, id 0, of `--shm-size` bytes.
    fn get_shmem_config(&self) -> std::io::Result<VhostUserShMemConfig> {
        if self.settings.shm_size == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no shared memory window (--shm-size 0)",
            ));
        }
        Ok(VhostUserShMemConfig::new(1, &[self.settings.shm_size]))
    }
}

impl DmabufBackend {
    /// Enters a worker's vrings in the list by queue, once.
    fn remember_vrings(&self, thread_id: usize, vrings: &[VringRwLock]) {
        let Some(&mask) = self.workers.get(thread_id) else {
            return;
        };
        if self.vrings_known.load(Ordering::Acquire) & mask == mask {
            return;
        }
        let mut mine = locked(&self.vrings);
        mine.resize(self.settings.num_queues(), None);
        for (event, vring) in vrings.iter().enumerate() {
            let queue = queue_of(&self.workers, thread_id, event);
            if let Some(slot) = queue.and_then(|q| mine.get_mut(usize::from(q))) {
                *slot = Some(vring.clone());
            }
        }
        self.vrings_known.fetch_or(mask, Ordering::AcqRel);
    }

    /// The vring of `queue`, once its worker has shown it.
    fn vring(&self, queue: u16) -> Option<VringRwLock> {
        locked(&self.vrings)
            .get(usize::from(queue))
            .cloned()
            .flatten()
    }

    /// Signals a queue once per batch, if the driver wants it (EVENT_IDX).
    fn signal(&self, vring: &VringRwLock) {
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    log::debug!("guest {}: signal used queue: {e}", self.guest);
                }
            }
            Ok(false) => {}
            Err(e) => log::debug!("guest {}: needs_notification: {e}", self.guest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_worker_per_queue_each_request_queue_past_controlq_has_its_own() {
        // controlq and the event queue only.
        assert_eq!(worker_queues(2, true), [0b11]);
        assert_eq!(worker_queues(4, true), [0b11, 0b100, 0b1000]);
        assert_eq!(worker_queues(4, false), [0b1111], "one worker");
        assert_eq!(queue_of(&worker_queues(4, false), 0, 3), Some(3));
        let workers = worker_queues(4, true);
        assert_eq!(queue_of(&workers, 0, 0), Some(0));
        assert_eq!(queue_of(&workers, 0, 1), Some(EVENTQ));
        assert_eq!(queue_of(&workers, 0, 2), None);
        assert_eq!(queue_of(&workers, 1, 0), Some(2));
        assert_eq!(queue_of(&workers, 2, 0), Some(3));
        assert_eq!(queue_of(&workers, 2, 1), None);
        assert_eq!(queue_of(&workers, 3, 0), None, "no such worker");
        // The most queues vhost-user-backend allows.
        let all = worker_queues(64, true);
        assert_eq!(all.len(), 63);
        assert_eq!(queue_of(&all, 62, 0), Some(63));
    }

    fn backend() -> DmabufBackend {
        use crate::exporter::{Exporter, ExporterConfig};
        use crate::provider::MemfdProvider;
        let ex = Exporter::new(
            ExporterConfig::default(),
            Box::new(MemfdProvider::new(1 << 20)),
            1,
        );
        let state = DeviceState::new(ex).expect("state");
        let settings = Arc::new(BackendSettings {
            request_queues: 1,
            worker_per_queue: false,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            shm_size: 1 << 20,
            page_size: 4096,
            max_segments: 1024,
            udmabuf: None,
            channel_wait: CHANNEL_WAIT,
        });
        DmabufBackend::new(0, state, settings, Arc::default())
    }

    #[test]
    fn config_reads_are_bounded_and_never_panic() {
        let b = backend();
        let c = b.get_config(0, 24);
        assert_eq!(c.len(), 24);
        assert_eq!(u32::from_le_bytes(c[0..4].try_into().expect("4")), 2);
        assert_eq!(
            u64::from_le_bytes(c[8..16].try_into().expect("8")),
            0,
            "no window live"
        );
        assert_eq!(b.get_config(20, 12), vec![0; 12]);
        assert!(b.get_config(u32::MAX - 2, 8).is_empty(), "overflow");
        assert!(b.get_config(0, u32::MAX).is_empty(), "absurd size");
        assert!(
            b.get_config(4000, 200).is_empty(),
            "past the readable bound"
        );
    }

    #[test]
    fn nothing_is_live_without_a_channel_and_memory() {
        let b = backend();
        assert_eq!(b.caps(), GuestCaps::default());
        assert!(b.get_shmem_config().is_ok());
        assert_eq!(b.queues_per_thread(), vec![0b11]);
        assert_eq!(b.wake_event(), 3);
    }

    #[test]
    fn offered_features_match_the_contract() {
        assert_eq!(VIRTIO_FEATURES, 1 << 32 | 1 << 29 | 1 << 28 | 1 << 30);
        let pf = protocol_features(1 << 20);
        for f in [
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::BACKEND_REQ,
            VhostUserProtocolFeatures::BACKEND_SEND_FD,
            VhostUserProtocolFeatures::RESET_DEVICE,
            VhostUserProtocolFeatures::SHARED_OBJECT,
            VhostUserProtocolFeatures::SHMEM,
        ] {
            assert!(pf.contains(f), "{f:?}");
        }
        assert_eq!(pf.bits() & (1 << 18), 1 << 18);
        assert_eq!(pf.bits() & (1 << 22), 1 << 22);
        assert!(!pf.contains(VhostUserProtocolFeatures::STATUS));
        assert!(!pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert!(!protocol_features(0).contains(VhostUserProtocolFeatures::SHMEM));
    }
}
