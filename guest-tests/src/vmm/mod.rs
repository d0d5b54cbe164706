// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A loopback VMM: the front-end half of vhost-user, played against the
//! daemon's socket the way Cloud Hypervisor does it (the `vhost` crate's
//! `Frontend`), with the guest's RAM in memfds shared with the daemon and
//! the [`Driver`] running on it in-process.
//!
//! [`LoopbackVmm::connect`] negotiates features (VERSION_1, EVENT_IDX,
//! INDIRECT_DESC, PROTOCOL_FEATURES) and protocol features (MQ, CONFIG,
//! REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, RESET_DEVICE, and SHMEM and
//! SHARED_OBJECT unless [`VmmOptions`] leaves them out, so the fallbacks
//! run too), reads the config space, sends the memory table, sets up every
//! vring with kick and call eventfds, and serves the back-end request
//! channel ([`channel`]): `SHMEM_MAP` into a real window of this process
//! ([`shm`]), the shared-object table.

pub mod channel;
pub mod crate_channel;
pub mod shm;

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserSharedMsg,
    VhostUserVirtioFeatures, VHOST_USER_MAX_VRINGS,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_dmabuf_protocol::{Config, CONFIG_SIZE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::driver::{
    BufferPool, ChainLayout, Driver, DriverConfig, DriverError, EventFdNotifier, RingLayout,
    VmGuestMemory,
};
use channel::{BackendMessage, ChannelServer, FrontendState, SharedObjectSource};
use crate_channel::CrateChannel;
use shm::{ShmError, ShmWindow};

/// Who serves the back-end request channel (`BACKEND_REQ` acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelKind {
    /// No `SET_BACKEND_REQ_FD`: the daemon has no channel to the VMM.
    None,
    /// The VMM's own [`ChannelServer`].
    #[default]
    Server,
    /// The `vhost` crate's `FrontendReqHandler` ([`CrateChannel`]),
    /// recording what it is asked.
    Crate,
}

/// How the loopback VMM presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmOptions {
    /// Guest RAM regions `(gpa, size)`, each its own memfd.
    pub ram: Vec<(u64, u64)>,
    /// Ring size of every queue.
    pub queue_size: u16,
    /// Queues to set up; `None` = `config.num_queues`.
    pub num_queues: Option<u16>,
    pub event_idx: bool,
    pub indirect: bool,
    /// Ack `VHOST_USER_PROTOCOL_F_SHMEM` (and map the window).
    pub shmem: bool,
    /// Ack `VHOST_USER_PROTOCOL_F_SHARED_OBJECT`.
    pub shared_object: bool,
    /// Ack `VHOST_USER_PROTOCOL_F_REPLY_ACK` (and ask for acks).
    pub reply_ack: bool,
    /// How long the driver's blocking calls wait.
    pub timeout: Duration,
    /// How the driver cuts typed requests into descriptors.
    pub chain_layout: ChainLayout,
    /// Who serves the back-end request channel.
    pub channel: ChannelKind,
    /// Protocol features never acked, whatever the flags above say.
    pub without_protocol: VhostUserProtocolFeatures,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            ram: vec![(0, 64 << 20)],
            queue_size: 256,
            num_queues: None,
            event_idx: true,
            indirect: true,
            shmem: true,
            shared_object: true,
            reply_ack: true,
            timeout: Duration::from_secs(5),
            chain_layout: ChainLayout::default(),
            channel: ChannelKind::default(),
            without_protocol: VhostUserProtocolFeatures::empty(),
        }
    }
}

impl VmmOptions {
    /// The same VMM without shared memory (`MAP_SHM` must fall back).
    pub fn without_shmem(mut self) -> Self {
        self.shmem = false;
        self
    }

    /// The same VMM without the shared-object table.
    pub fn without_shared_object(mut self) -> Self {
        self.shared_object = false;
        self
    }

    /// The same VMM never acking the protocol features `features`.
    pub fn without_protocol(mut self, features: VhostUserProtocolFeatures) -> Self {
        self.without_protocol |= features;
        self
    }

    /// The same VMM with the back-end channel served by `channel`.
    pub fn with_channel(mut self, channel: ChannelKind) -> Self {
        self.channel = channel;
        self
    }
}

/// What was offered and acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub offered_features: u64,
    pub features: u64,
    pub offered_protocol: VhostUserProtocolFeatures,
    pub protocol: VhostUserProtocolFeatures,
    /// `GET_QUEUE_NUM` (2 without MQ).
    pub queue_num: u64,
    /// Queues set up.
    pub num_queues: u16,
    /// Size of shared memory region 0 (`GET_SHMEM_CONFIG`), 0 if none.
    pub shm_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user {what}: {source}")]
    Vhost {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Shm(#[from] ShmError),
}

fn vhost(what: &'static str) -> impl FnOnce(vhost::Error) -> VmmError {
    move |source| VmmError::Vhost { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

/// The guest's RAM: memfd-backed regions the daemon maps too.
#[derive(Debug)]
struct GuestRam {
    mem: Arc<GuestMemoryMmap<()>>,
}

impl GuestRam {
    /// Each region is a memfd sealed against shrinking and growing once
    /// sized, as QEMU's `memory-backend-memfd` seals its RAM: the daemon
    /// may then turn guest pages into a udmabuf (which needs
    /// `F_SEAL_SHRINK`, section 10), and no mapping of it can fault past
    /// a new end.
    fn new(regions: &[(u64, u64)]) -> Result<Self, VmmError> {
        use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
        let mut ranges = Vec::with_capacity(regions.len());
        for (i, &(gpa, size)) in regions.iter().enumerate() {
            let fd = memfd_create(
                format!("guest-ram-{i}"),
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
            .map_err(|e| io_err("memfd_create")(e.into()))?;
            let file = File::from(fd);
            file.set_len(size).map_err(io_err("sizing guest RAM"))?;
            fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)
                .map_err(|e| io_err("sealing guest RAM")(e.into()))?;
            let size = usize::try_from(size)
                .map_err(|_| VmmError::Unsupported(format!("RAM region of {size:#x} bytes")))?;
            ranges.push((GuestAddress(gpa), size, Some(FileOffset::new(file, 0))));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges)
            .map_err(|e| VmmError::Unsupported(format!("guest RAM layout: {e}")))?;
        Ok(GuestRam { mem: Arc::new(mem) })
    }

    fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, VmmError> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(vhost("memory region"))
            })
            .collect()
    }

    /// The VMM's address of a guest-physical address (vring addresses are
    /// given to the back-end in this space).
    fn hva(&self, gpa: u64) -> Result<u64, VmmError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| VmmError::Unsupported(format!("gpa {gpa:#x}: {e}")))
    }
}

/// The loopback VMM, connected to one daemon socket.
pub struct LoopbackVmm {
    socket_path: PathBuf,
    options: VmmOptions,
    frontend: Frontend,
    negotiated: Negotiated,
    config: Config,
    ram: GuestRam,
    memory: Arc<VmGuestMemory>,
    pool: Arc<BufferPool>,
    notifier: Arc<EventFdNotifier>,
    state: Arc<FrontendState>,
    channel: Option<ChannelServer>,
    crate_channel: Option<CrateChannel>,
    driver: Driver,
}

impl std::fmt::Debug for LoopbackVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackVmm")
            .field("socket_path", &self.socket_path)
            .field("negotiated", &self.negotiated)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LoopbackVmm {
    /// Connects to the daemon at `socket_path` and brings the device up.
    pub fn connect(socket_path: impl AsRef<Path>, options: VmmOptions) -> Result<Self, VmmError> {
        let socket_path = socket_path.as_ref().to_path_buf();
        let mut fe =
            Frontend::connect(&socket_path, VHOST_USER_MAX_VRINGS).map_err(vhost("connect"))?;
        fe.set_owner().map_err(vhost("SET_OWNER"))?;
        let offered_features = fe.get_features().map_err(vhost("GET_FEATURES"))?;
        let required =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered_features & required != required {
            return Err(VmmError::Unsupported(format!(
                "back-end features {offered_features:#x} lack VERSION_1 or PROTOCOL_FEATURES"
            )));
        }
        let offered_protocol = fe
            .get_protocol_features()
            .map_err(vhost("GET_PROTOCOL_FEATURES"))?;
        let mut wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if options.reply_ack {
            wanted |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        if options.shmem {
            wanted |= VhostUserProtocolFeatures::SHMEM;
        }
        if options.shared_object {
            wanted |= VhostUserProtocolFeatures::SHARED_OBJECT;
        }
        let protocol = offered_protocol & wanted & !options.without_protocol;
        fe.set_protocol_features(protocol)
            .map_err(vhost("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vhost("GET_QUEUE_NUM"))?
        } else {
            2
        };

        let mut shm_size = 0;
        let mut window = None;
        if protocol.contains(VhostUserProtocolFeatures::SHMEM) {
            let cfg = fe.get_shmem_config().map_err(vhost("GET_SHMEM_CONFIG"))?;
            let sizes = cfg.memory_sizes;
            if cfg.nregions >= 1 && sizes[0] > 0 {
                shm_size = sizes[0];
                window = Some(Arc::new(
                    ShmWindow::new(shm_size).map_err(io_err("shm window"))?,
                ));
            }
        }
        let state = Arc::new(FrontendState::new(window));
        let mut channel = None;
        let mut crate_channel = None;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ)
            && options.channel == ChannelKind::Crate
        {
            let (server, theirs) =
                CrateChannel::start(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK))
                    .map_err(io_err("backend channel"))?;
            fe.set_backend_request_fd(&theirs)
                .map_err(vhost("SET_BACKEND_REQ_FD"))?;
            crate_channel = Some(server);
        }
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ)
            && options.channel == ChannelKind::Server
        {
            let (server, theirs) =
                ChannelServer::start(state.clone()).map_err(io_err("backend channel"))?;
            fe.set_backend_request_fd(&theirs)
                .map_err(vhost("SET_BACKEND_REQ_FD"))?;
            channel = Some(server);
            // `theirs` drops here: the daemon holds the only copy now.
        }
        state.set_frontend(Some(fe.clone()));

        let mut features = offered_features & required;
        if options.event_idx {
            features |= offered_features & (1 << VIRTIO_RING_F_EVENT_IDX);
        }
        if options.indirect {
            features |= offered_features & (1 << VIRTIO_RING_F_INDIRECT_DESC);
        }
        fe.set_features(features).map_err(vhost("SET_FEATURES"))?;

        let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, bytes) = fe
                .get_config(
                    0,
                    CONFIG_SIZE as u32,
                    VhostUserConfigFlags::empty(),
                    &[0u8; CONFIG_SIZE],
                )
                .map_err(vhost("GET_CONFIG"))?;
            Config::from_bytes(&bytes)
                .ok_or_else(|| VmmError::Unsupported("short config space".into()))?
        } else {
            Config {
                num_queues: 2,
                ..Config::default()
            }
        };
        let num_queues = options
            .num_queues
            .unwrap_or(u16::try_from(config.num_queues).unwrap_or(u16::MAX))
            .min(u16::try_from(queue_num).unwrap_or(u16::MAX));
        if num_queues < 2 {
            return Err(VmmError::Unsupported(format!(
                "{num_queues} queues: the device needs a controlq and an eventq"
            )));
        }

        let ram = GuestRam::new(&options.ram)?;
        fe.set_mem_table(&ram.region_infos()?)
            .map_err(vhost("SET_MEM_TABLE"))?;
        let memory = Arc::new(VmGuestMemory::new(ram.mem.clone()));
        // Page 0 stays out of the pool: a zero address is always a bug.
        let pool_ranges: Vec<(u64, u64)> = options
            .ram
            .iter()
            .map(|&(gpa, size)| {
                if gpa == 0 {
                    (4096, size.saturating_sub(4096))
                } else {
                    (gpa, size)
                }
            })
            .collect();
        let pool = Arc::new(BufferPool::new(&pool_ranges));
        let notifier = Arc::new(EventFdNotifier::new(num_queues).map_err(io_err("eventfds"))?);

        let driver_config = DriverConfig {
            num_queues,
            queue_size: options.queue_size,
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect: features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            timeout: options.timeout,
        };
        let driver = Driver::new(
            memory.clone(),
            notifier.clone(),
            pool.clone(),
            driver_config,
        )?;
        driver.set_chain_layout(options.chain_layout);
        program_vrings(&mut fe, &ram, &notifier, &driver, None)?;
        Ok(LoopbackVmm {
            socket_path,
            negotiated: Negotiated {
                offered_features,
                features,
                offered_protocol,
                protocol,
                queue_num,
                num_queues,
                shm_size,
            },
            options,
            frontend: fe,
            config,
            ram,
            memory,
            pool,
            notifier,
            state,
            channel,
            crate_channel,
            driver,
        })
    }

    /// The guest driver on this VMM's memory and queues.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The config space read at connect (section 3).
    pub fn config(&self) -> Config {
        self.config
    }

    pub fn options(&self) -> &VmmOptions {
        &self.options
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The vhost-user connection, for tests that send messages themselves.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The eventfds of every queue (kick and interrupt counts).
    pub fn notifier(&self) -> &Arc<EventFdNotifier> {
        &self.notifier
    }

    /// The guest's memory as vm-memory sees it.
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap<()>> {
        &self.ram.mem
    }

    /// The guest RAM regions as `SET_MEM_TABLE` describes them, in
    /// [`VmmOptions::ram`] order (send a subset to take RAM away).
    pub fn memory_regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, VmmError> {
        self.ram.region_infos()
    }

    /// `GET_CONFIG` of `size` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, VmmError> {
        let buf = vec![0u8; size as usize];
        self.frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .map(|(_, bytes)| bytes)
            .map_err(vhost("GET_CONFIG"))
    }

    // ---- shared memory region 0 ----

    /// The window, when SHMEM was negotiated and the region is non-empty.
    pub fn shm(&self) -> Option<&ShmWindow> {
        self.state.shm.as_deref()
    }

    /// Reads the window as the guest reads the shared memory BAR.
    pub fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, VmmError> {
        let shm = self
            .shm()
            .ok_or_else(|| VmmError::Unsupported("no shared memory region".into()))?;
        Ok(shm.read(offset, len)?)
    }

    /// Writes the window as the guest writes the shared memory BAR.
    pub fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        let shm = self
            .shm()
            .ok_or_else(|| VmmError::Unsupported("no shared memory region".into()))?;
        Ok(shm.write(offset, data)?)
    }

    // ---- shared objects ----

    /// The VM's shared-object table.
    pub fn shared_objects(&self) -> Vec<(Uuid, SharedObjectSource)> {
        self.state.shared_objects()
    }

    /// UUIDs the daemon published (`SHARED_OBJECT_ADD`) and not removed.
    pub fn backend_shared_objects(&self) -> Vec<Uuid> {
        self.state.backend_objects()
    }

    /// Publishes an object of another device of the VM, for `OPEN`
    /// `BY_UUID` to find through `SHARED_OBJECT_LOOKUP`.
    pub fn publish_shared_object(&self, uuid: Uuid, fd: OwnedFd) {
        self.state.publish_external(uuid, fd);
    }

    /// `GET_SHARED_OBJECT`: the fd the daemon holds for one of its UUIDs.
    pub fn get_shared_object(&mut self, uuid: Uuid) -> Result<File, VmmError> {
        self.frontend
            .get_shared_object(&VhostUserSharedMsg { uuid })
            .map_err(vhost("GET_SHARED_OBJECT"))
    }

    /// Every back-end channel request so far.
    pub fn backend_requests(&self) -> Vec<BackendMessage> {
        self.state.log()
    }

    /// The `vhost` crate's handler, when it serves the back-end channel
    /// ([`ChannelKind::Crate`]).
    pub fn crate_channel(&self) -> Option<&CrateChannel> {
        self.crate_channel.as_ref()
    }

    /// What the back-end channel shares with the VMM (the shared-object
    /// table, the request log, holding `LOOKUP`s).
    pub fn frontend_state(&self) -> &Arc<FrontendState> {
        &self.state
    }

    // ---- lifecycle ----

    /// `GET_VRING_BASE` on every queue, as a VMM does on pause: the daemon
    /// completes the waiting chains with `ECANCELED` and stops. Returns the
    /// bases for [`resume`](Self::resume).
    pub fn stop_vrings(&mut self) -> Result<Vec<u32>, VmmError> {
        (0..usize::from(self.negotiated.num_queues))
            .map(|q| {
                self.frontend
                    .get_vring_base(q)
                    .map_err(vhost("GET_VRING_BASE"))
            })
            .collect()
    }

    /// Restarts the vrings where [`stop_vrings`](Self::stop_vrings) left
    /// them, with the same driver.
    pub fn resume(&mut self, bases: &[u32]) -> Result<(), VmmError> {
        program_vrings(
            &mut self.frontend,
            &self.ram,
            &self.notifier,
            &self.driver,
            Some(bases),
        )
    }

    /// Starts vring `queue` afresh after a stop (or a `RESET_DEVICE`):
    /// empty rings in new guest memory, base 0, the same eventfds. What
    /// the old rings had in flight is dropped.
    pub fn restart_ring(&mut self, queue: u16) -> Result<(), VmmError> {
        let layout = self.driver.restart_queue(queue)?;
        self.program_ring(queue, layout, 0)
    }

    /// Starts vring `queue` (stopped first) with its parts at `layout`,
    /// which the driver did not lay out and does not serve, from avail
    /// and used index `base`: the front-end's own addresses, to see what
    /// the back-end makes of rings no driver would set up.
    pub fn program_ring(
        &mut self,
        queue: u16,
        layout: RingLayout,
        base: u16,
    ) -> Result<(), VmmError> {
        program_vring(
            &mut self.frontend,
            &self.ram,
            &self.notifier,
            queue,
            layout,
            base,
        )
    }

    /// A device reset as the guest triggers it: stop the vrings,
    /// `RESET_DEVICE`, then bring the device up again with fresh rings
    /// (the old driver and its tickets are gone).
    pub fn reset(&mut self) -> Result<(), VmmError> {
        if !self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            return Err(VmmError::Unsupported(
                "RESET_DEVICE was not negotiated".into(),
            ));
        }
        self.stop_vrings()?;
        self.frontend
            .reset_device()
            .map_err(vhost("RESET_DEVICE"))?;
        self.frontend
            .set_features(self.negotiated.features)
            .map_err(vhost("SET_FEATURES"))?;
        // Fresh rings; the old driver's buffers go back to the pool.
        self.driver = Driver::new(
            self.memory.clone(),
            self.notifier.clone(),
            self.pool.clone(),
            self.driver.config(),
        )?;
        self.driver.set_chain_layout(self.options.chain_layout);
        program_vrings(
            &mut self.frontend,
            &self.ram,
            &self.notifier,
            &self.driver,
            None,
        )
    }

    fn teardown(&mut self) {
        // The channel thread holds a clone of the connection for LOOKUP;
        // let go of it first so dropping ours closes the socket.
        self.state.set_frontend(None);
        // A held LOOKUP must be answered for the channel thread to end.
        self.state.hold_lookups(false);
        if let Some(shm) = self.shm() {
            shm.clear();
        }
    }

    /// Closes the connection: the daemon must release everything the
    /// guest held (section 6, Lifetimes).
    pub fn disconnect(self) {
        drop(self);
    }

    /// Disconnects and connects again to the same socket with the same
    /// options: a new session with a new driver.
    pub fn reconnect(self) -> Result<Self, VmmError> {
        let (path, options) = (self.socket_path.clone(), self.options.clone());
        drop(self);
        LoopbackVmm::connect(path, options)
    }
}

impl Drop for LoopbackVmm {
    fn drop(&mut self) {
        self.teardown();
        // `frontend` (the socket) and `channel` (shut down and joined) drop
        // after this, in field order.
        let _ = self.channel.take();
        let _ = self.crate_channel.take();
    }
}

/// Tells the back-end where each of the driver's rings is and starts it:
/// size, base (0, or where `stop_vrings` left it), addresses in the VMM's
/// address space, call and kick eventfds (kick last: it marks the vring
/// ready), enable.
fn program_vrings(
    fe: &mut Frontend,
    ram: &GuestRam,
    notifier: &EventFdNotifier,
    driver: &Driver,
    bases: Option<&[u32]>,
) -> Result<(), VmmError> {
    for (q, layout) in driver.ring_layouts().into_iter().enumerate() {
        let base = bases.and_then(|b| b.get(q)).copied().unwrap_or(0);
        let qi = u16::try_from(q)
            .map_err(|_| VmmError::Unsupported(format!("queue {q} out of range")))?;
        program_vring(fe, ram, notifier, qi, layout, base as u16)?;
    }
    Ok(())
}

/// Tells the back-end where one ring is and starts it (see
/// [`program_vrings`]).
fn program_vring(
    fe: &mut Frontend,
    ram: &GuestRam,
    notifier: &EventFdNotifier,
    qi: u16,
    layout: RingLayout,
    base: u16,
) -> Result<(), VmmError> {
    let q = usize::from(qi);
    fe.set_vring_num(q, layout.size)
        .map_err(vhost("SET_VRING_NUM"))?;
    fe.set_vring_base(q, base)
        .map_err(vhost("SET_VRING_BASE"))?;
    let addr = VringConfigData {
        queue_max_size: layout.size,
        queue_size: layout.size,
        flags: 0,
        desc_table_addr: ram.hva(layout.desc)?,
        used_ring_addr: ram.hva(layout.used)?,
        avail_ring_addr: ram.hva(layout.avail)?,
        log_addr: None,
    };
    fe.set_vring_addr(q, &addr)
        .map_err(vhost("SET_VRING_ADDR"))?;
    let missing = || VmmError::Unsupported(format!("no eventfd for queue {qi}"));
    let call = notifier.call_fd(qi).ok_or_else(missing)?;
    let kick = notifier.kick_fd(qi).ok_or_else(missing)?;
    fe.set_vring_call(q, call)
        .map_err(vhost("SET_VRING_CALL"))?;
    fe.set_vring_kick(q, kick)
        .map_err(vhost("SET_VRING_KICK"))?;
    fe.set_vring_enable(q, true)
        .map_err(vhost("SET_VRING_ENABLE"))?;
    Ok(())
}
