// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Running the daemon: the shared model, one listener thread per guest
//! socket, a fresh vhost-user back-end for every connection, the timer
//! thread and the control plane.
//!
//! [`start`] runs everything on background threads and returns a
//! [`DaemonHandle`]; [`DaemonHandle::stop`] stops it and removes the
//! sockets. [`run`] is what the binary does: start, wait for SIGINT or
//! SIGTERM, stop. Tests (and the guest-tests crate) start the real daemon
//! in-process against real Unix sockets.
//!
//! Lifecycle of one socket (section 6): the listener waits for a front-end;
//! each connection gets its own `VhostUserDaemon` (vhost-user-backend
//! serves one connection per daemon) and `DmabufBackend`; when the
//! front-end hangs up, everything the guest held is released and the same
//! socket accepts the next front-end (`backend/listener.rs`).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::activation::{self, ActivationError, ListeningSocket};
use crate::backend::listener::{Shared, Socket};
use crate::backend::{BackendSettings, CHANNEL_WAIT, DEFAULT_MAX_QUEUE_SIZE};
use crate::control::{spawn_control_plane, ControlHandle};
use crate::exporter::{ExportSpec, Exporter, ExporterConfig, GuestId, HostError, Limits};
use crate::provider::{
    self, ProviderChoice, ProviderError, UdmabufProvider, DMA_HEAP_SYSTEM_NODE, UDMABUF_NODE,
};
use crate::state::DeviceState;

/// The program's one-line help (`--help`, the man page's NAME).
pub const ABOUT: &str = "vhost-user back-end for the virtio-dmabuf device (virtio ID 37): \
share host dma-buf memory with guests";

/// The program's `--help` description.
pub const LONG_ABOUT: &str = "vhost-user back-end for the virtio-dmabuf device (virtio ID 37).

Guests create, open, attach, map, lock and fence buffers through the device's
virtqueues; the daemon exports them from host memory (memfd, udmabuf,
dma-heap or host dma-bufs handed to it) or wraps guest RAM pages. Each
--socket-path socket serves one guest (one VMM front-end at a time; when it
disconnects, everything that guest held is released and the socket accepts
the next one).

Logging: set RUST_LOG (error, warn, info (default), debug, trace); debug
shows every vhost-user message and every request with its status.
SIGINT and SIGTERM stop the daemon and remove the sockets it bound.
Started by systemd, it takes the sockets of a socket unit (LISTEN_FDS)
and reports readiness (NOTIFY_SOCKET, Type=notify).";

/// Default size of shared memory region 0 (`--shm-size`): 256 MiB.
pub const DEFAULT_SHM_SIZE: u64 = 256 << 20;
/// Default fence timeout (`--fence-timeout`, section 7.6).
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most guest sockets one daemon serves (`--socket-count`).
pub const MAX_SOCKETS: usize = 64;
/// Most request queues (`--queues`): with the eventq, 64 queues.
pub const MAX_REQUEST_QUEUES: u16 = 63;

/// A host export to register at start (`--export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub spec: ExportSpec,
    /// The buffer: a dma-buf (or, for tests, any sized file) opened by path.
    pub path: PathBuf,
}

/// Everything the daemon needs; built from the command line by
/// `TryFrom<Args>` (`args.rs`), or directly by tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// One socket per guest; guest `i` is `socket_paths[i]`.
    pub socket_paths: Vec<PathBuf>,
    /// Listening sockets the daemon was handed (`--socket-fd`, systemd
    /// socket activation): guest `i` serves on `listen_sockets[i]`, when
    /// there is one, instead of binding `socket_paths[i]` (which is then
    /// the path that socket is bound to, or empty). Such a socket's file is
    /// never removed by the daemon.
    pub listen_sockets: Vec<Option<ListeningSocket>>,
    pub provider: ProviderChoice,
    /// Shared memory region 0 in bytes; 0: `SHMEM` is not offered.
    pub shm_size: u64,
    /// Request queues; the device has one more (the eventq).
    pub request_queues: u16,
    /// A vring worker per request queue past the first (`--worker-per-queue`).
    pub worker_per_queue: bool,
    /// Per-guest quotas (`--max-objects`, `--max-bytes`, the rest default).
    pub limits: Limits,
    /// Largest memfd or dma-heap object (udmabuf has its own cap).
    pub max_object_size: u64,
    pub fence_timeout: Duration,
    pub control_socket: Option<PathBuf>,
    pub exports: Vec<ExportConfig>,
    /// Tests only: `EXPORT_UUID` of memfd objects.
    pub allow_memfd_shared_objects: bool,
    /// Largest ring size (a power of two).
    pub max_queue_size: u16,
    /// `run` may lower `limits.max_fd_objects` so that every guest at its
    /// fd quota fits in the open-file limit (no `--max-fd-objects` given);
    /// otherwise a quota the limit cannot hold stops the daemon at start.
    pub fit_max_fd_objects: bool,
}

impl Config {
    /// The defaults for one guest on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Config {
        let limits = Limits::default();
        Config {
            socket_paths: vec![socket_path.into()],
            listen_sockets: Vec::new(),
            provider: ProviderChoice::Memfd,
            shm_size: DEFAULT_SHM_SIZE,
            request_queues: 1,
            worker_per_queue: false,
            max_object_size: limits.max_bytes,
            limits,
            fence_timeout: DEFAULT_FENCE_TIMEOUT,
            control_socket: None,
            exports: Vec::new(),
            allow_memfd_shared_objects: false,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            fit_max_fd_objects: true,
        }
    }
}

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--provider {choice}: {source}{hint}")]
    Provider {
        choice: ProviderChoice,
        #[source]
        source: ProviderError,
        /// What the operator can change (empty, or `"; ..."`).
        hint: &'static str,
    },
    #[error("listening on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("guest {guest}: the socket handed over as fd {fd}: {source}")]
    HandedSocket {
        guest: GuestId,
        fd: std::os::fd::RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Activation(#[from] ActivationError),
    #[error(
        "the open file limit is {soft} (hard {hard}), but {guests} guest(s) holding \
         --max-fd-objects {max_fd_objects} objects with fds of their own each may need \
         {need} open files: lower --max-fd-objects or --socket-count, or raise the limit \
         (LimitNOFILE= in the systemd unit, ulimit -n)"
    )]
    FdLimit {
        soft: u64,
        hard: String,
        guests: usize,
        max_fd_objects: u32,
        need: u64,
    },
    #[error(
        "systemd handed over socket {name:?} bound to {path:?}, which is none of the \
         daemon's sockets ({expected}): ListenStream= of the socket unit and \
         --socket-path must name the same path"
    )]
    UnexpectedSocket {
        name: String,
        path: Option<PathBuf>,
        expected: String,
    },
    #[error("--export {name}: cannot open {path}: {source}{hint}")]
    ExportOpen {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
        /// What the operator can change (empty, or `"; ..."`).
        hint: &'static str,
    },
    #[error("--export {name}: {path}: {source}")]
    ExportImport {
        name: String,
        path: PathBuf,
        #[source]
        source: ProviderError,
    },
    #[error("--export {name}: {source}")]
    ExportRegister {
        name: String,
        #[source]
        source: HostError,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// The running daemon. [`DaemonHandle::stop`] (or dropping it) ends every
/// connection and thread and removes the sockets.
#[derive(Debug)]
pub struct DaemonHandle {
    state: Arc<DeviceState>,
    shared: Arc<Shared>,
    socket_paths: Vec<PathBuf>,
    listeners: Vec<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
    control: Option<ControlHandle>,
}

impl DaemonHandle {
    /// The model and its wake-ups, shared by every guest.
    pub fn state(&self) -> &Arc<DeviceState> {
        &self.state
    }

    /// The guest sockets, guest `i` at index `i`.
    pub fn socket_paths(&self) -> &[PathBuf] {
        &self.socket_paths
    }

    /// The control socket, when one was asked for.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlHandle::path)
    }

    /// Stops everything: live connections are hung up (their guests'
    /// state released), threads joined, the sockets it bound removed
    /// (handed-over ones are left to their owner).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.listeners.is_empty() && self.timer.is_none() && self.control.is_none() {
            return;
        }
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.shared.stop_event.write(1) {
            log::error!("waking the listeners: {e}");
        }
        for handle in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
        {
            handle.shutdown();
        }
        for t in self.listeners.drain(..) {
            if t.join().is_err() {
                log::error!("a listener thread panicked");
            }
        }
        if let Some(control) = self.control.take() {
            control.stop();
        }
        self.state.stop_timer();
        if let Some(t) = self.timer.take() {
            if t.join().is_err() {
                log::error!("the timer thread panicked");
            }
        }
        log::info!("stopped");
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the daemon: binds every socket, registers the `--export`s,
/// starts the timer and the control plane, and serves front-ends on
/// background threads.
pub fn start(config: Config) -> Result<DaemonHandle, DaemonError> {
    let provider =
        provider::open_provider(config.provider, config.max_object_size).map_err(|source| {
            DaemonError::Provider {
                choice: config.provider,
                hint: provider_hint(&source),
                source,
            }
        })?;
    let host_exports = config.control_socket.is_some() || !config.exports.is_empty();
    let exporter_config = ExporterConfig {
        limits: config.limits,
        fence_timeout: config.fence_timeout,
        num_queues: u32::from(config.request_queues) + 1,
        host_exports,
        allow_memfd_shared_objects: config.allow_memfd_shared_objects,
        ..ExporterConfig::default()
    };
    let page_size = exporter_config.page_size;
    let mut exporter = Exporter::new(exporter_config, provider, config.socket_paths.len());
    for export in &config.exports {
        register_export(&mut exporter, export)?;
    }
    let state = DeviceState::new(exporter).map_err(io_error("creating the wake-up eventfds"))?;

    let udmabuf = match UdmabufProvider::open() {
        Ok(dev) => Some(Arc::new(dev)),
        Err(e) => {
            log::info!("guest pages are emulated (no REAL_DMABUF): {e}");
            None
        }
    };
    let settings = Arc::new(BackendSettings {
        request_queues: config.request_queues,
        worker_per_queue: config.worker_per_queue,
        max_queue_size: config.max_queue_size,
        shm_size: config.shm_size,
        page_size: u32::try_from(page_size).unwrap_or(u32::MAX),
        max_segments: config.limits.max_segments,
        udmabuf,
        channel_wait: CHANNEL_WAIT,
    });

    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        stop_event: EventFd::new(EFD_NONBLOCK).map_err(io_error("creating the stop eventfd"))?,
        connections: Mutex::new(vec![None; config.socket_paths.len()]),
    });

    // Bind every socket before anything runs, so a bad path fails the start
    // (and once a socket exists, the daemon's idle set of fds is complete:
    // the control plane, if any, is the only thing started after this).
    let mut listeners = Vec::with_capacity(config.socket_paths.len());
    let mut serving = Vec::with_capacity(config.socket_paths.len());
    for (guest, path) in config.socket_paths.iter().enumerate() {
        let listener = match config.listen_sockets.get(guest).and_then(Option::as_ref) {
            // Handed over: accepted on as it is; its path (if any) is left
            // alone at stop (`Listener::from` knows no path).
            Some(socket) => {
                let fd = socket.handed_as();
                serving.push(format!("{} (handed over as fd {fd})", path.display()));
                Listener::from(
                    socket
                        .listener()
                        .map_err(|source| DaemonError::HandedSocket { guest, fd, source })?,
                )
            }
            None => {
                serving.push(path.display().to_string());
                Listener::new(path, true).map_err(|source| DaemonError::Listen {
                    path: path.clone(),
                    source,
                })?
            }
        };
        listeners.push(listener);
    }
    let mut handle = DaemonHandle {
        state: Arc::clone(&state),
        shared: Arc::clone(&shared),
        socket_paths: config.socket_paths.clone(),
        listeners: Vec::new(),
        timer: None,
        control: None,
    };
    handle.timer = Some(
        state
            .spawn_timer()
            .map_err(io_error("starting the timer"))?,
    );
    if let Some(path) = &config.control_socket {
        let control = spawn_control_plane(path, Arc::clone(&state)).map_err(|source| {
            DaemonError::Control {
                path: path.clone(),
                source,
            }
        })?;
        handle.control = Some(control);
    }
    for (guest, (listener, path)) in listeners.into_iter().zip(&config.socket_paths).enumerate() {
        let ctx = Socket {
            guest,
            socket_dir: path.parent().map(Path::to_path_buf),
            state: Arc::clone(&state),
            settings: Arc::clone(&settings),
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name(format!("dmabuf-listen{guest}"))
            .spawn(move || ctx.serve(listener))
            .map_err(io_error("starting a listener thread"))?;
        handle.listeners.push(thread);
    }
    for (guest, what) in serving.iter().enumerate() {
        log::info!("guest {guest}: listening on {what}");
    }
    Ok(handle)
}

/// Starts the daemon and serves until SIGINT or SIGTERM, then stops it
/// (sockets removed).
///
/// Started by systemd: the sockets of a socket unit (`LISTEN_FDS`) serve
/// the guests whose `--socket-path` they are bound to, and the service
/// manager hears `READY=1` once every socket listens (`Type=notify`) and
/// `STOPPING=1` on the way out.
pub fn run(mut config: Config) -> Result<(), DaemonError> {
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals wait for `sigwait` here.
    let signals = block_stop_signals().map_err(io_error("blocking SIGINT/SIGTERM"))?;
    take_systemd_sockets(&mut config)?;
    fit_fd_limit(&mut config)?;
    let guests = config.socket_paths.len();
    let handle = start(config)?;
    notify(&format!("READY=1\nSTATUS=serving {guests} guest socket(s)"));
    let signal = wait_for_signal(&signals).map_err(io_error("waiting for a signal"))?;
    log::info!("signal {signal}: stopping");
    notify("STOPPING=1");
    handle.stop();
    Ok(())
}

/// Tells the service manager, if there is one; a failure is only logged
/// (the daemon serves all the same).
fn notify(state: &str) {
    match activation::notify(state) {
        Ok(true) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => log::warn!("telling the service manager {state:?} (NOTIFY_SOCKET): {e}"),
    }
}

/// Socket activation: every socket systemd handed over must be bound to
/// one of the guests' paths, and that guest serves on it.
fn take_systemd_sockets(config: &mut Config) -> Result<(), DaemonError> {
    for (socket, name) in activation::systemd_sockets()? {
        let guest = socket
            .path()
            .and_then(|p| config.socket_paths.iter().position(|q| q == p))
            .filter(|&g| config.listen_sockets.get(g).is_none_or(Option::is_none));
        let Some(guest) = guest else {
            return Err(DaemonError::UnexpectedSocket {
                name,
                path: socket.path().map(Path::to_path_buf),
                expected: config
                    .socket_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        log::debug!("guest {guest}: socket {name:?} handed over by systemd");
        if config.listen_sockets.len() <= guest {
            config.listen_sockets.resize(guest + 1, None);
        }
        config.listen_sockets[guest] = Some(socket);
    }
    Ok(())
}

/// Open files the daemon may need with `config`, per guest: up to two per
/// object with fds of its own (udmabuf: the memfd and the dma-buf; small
/// memfd objects are extents of slabs and hold none, see
/// `exporter/objects.rs`, "fds"), three eventfds per queue, one per guest
/// memory region (vhost-user allows up to 509) and a few for the
/// connection; plus a reserve for the daemon's own files, the control
/// plane's clients, reconnects, the fds SHMEM_MAP and shared-object
/// messages carry and the one a new slab holds while it is mapped
/// ([`FD_RESERVE`]).
pub fn fd_budget(config: &Config) -> u64 {
    fixed_fds(config) + FDS_PER_OBJECT * u64::from(fd_objects(config)) * guests(config)
}

/// The objects with fds of their own one guest may have: its fd quota,
/// or its object quota where that is lower (a charged object is one the
/// guest holds).
fn fd_objects(config: &Config) -> u32 {
    config.limits.max_fd_objects.min(config.limits.max_objects)
}

/// Open files kept free of every guest's objects: the daemon's own, the
/// control plane's clients, reconnects, the fds of back-end messages, and
/// the one of a slab being made (closed once it is mapped).
pub const FD_RESERVE: u64 = 256;

/// A host-placed object holds at most this many fds (udmabuf: the memfd
/// and the dma-buf).
const FDS_PER_OBJECT: u64 = 2;

fn guests(config: &Config) -> u64 {
    config.socket_paths.len().max(1) as u64
}

/// [`fd_budget`] without the objects.
fn fixed_fds(config: &Config) -> u64 {
    let queues = u64::from(config.request_queues) + 1;
    (3 * queues + 512 + 64) * guests(config) + FD_RESERVE
}

/// The largest per-guest fd quota whose worst case fits in `limit` open
/// files, if there is one above 0.
pub fn max_fd_objects_within(config: &Config, limit: u64) -> Option<u32> {
    let room = limit.checked_sub(fixed_fds(config))?;
    let fit = room / (FDS_PER_OBJECT * guests(config));
    u32::try_from(fit.min(u64::from(u32::MAX)))
        .ok()
        .filter(|&n| n > 0)
}

/// Raises the soft open-file limit to the hard limit and logs both; then
/// makes every guest at its fd quota fit in it, so that no guest can take
/// the files another guest's `CREATE` needs: without `--max-fd-objects`
/// the default quota is lowered to fit, and a quota given that cannot fit
/// stops the daemon with what to change. The object quota needs no files
/// (small objects are extents of slabs) and is never lowered.
fn fit_fd_limit(config: &mut Config) -> Result<(), DaemonError> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum;
    let hard_text = hard.map_or_else(|| "unlimited".to_string(), |h| h.to_string());
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let target = hard.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(soft)
    });
    if target > soft {
        let raised = Rlimit {
            current: Some(target),
            maximum: hard,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = target,
            Err(e) => log::warn!("raising the open file limit from {soft} to {target}: {e}"),
        }
    }
    log::info!("open file limit: {soft} (hard {hard_text})");
    let need = fd_budget(config);
    if need <= soft {
        return Ok(());
    }
    let refused = DaemonError::FdLimit {
        soft,
        hard: hard_text,
        guests: config.socket_paths.len(),
        max_fd_objects: fd_objects(config),
        need,
    };
    if !config.fit_max_fd_objects {
        return Err(refused);
    }
    let Some(fit) = max_fd_objects_within(config, soft) else {
        return Err(refused);
    };
    log::warn!(
        "the open file limit {soft} holds {} guest(s) at {fit} objects with fds of their \
         own each, not {}: --max-fd-objects is {fit} (raise LimitNOFILE= or ulimit -n for \
         more; small memfd objects need no fd and stay within --max-objects {})",
        config.socket_paths.len(),
        fd_objects(config),
        config.limits.max_objects
    );
    config.limits.max_fd_objects = fit;
    Ok(())
}

/// What an operator can do about a provider that would not open.
fn provider_hint(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::MissingDevice { node, .. } if *node == UDMABUF_NODE => {
            "; load the udmabuf kernel module (modprobe udmabuf), or start with \
             --provider auto (udmabuf, else dma-heap, else memfd) or --provider memfd"
        }
        ProviderError::MissingDevice { node, .. } if *node == DMA_HEAP_SYSTEM_NODE => {
            "; the kernel needs the system dma-heap (CONFIG_DMABUF_HEAPS_SYSTEM), or \
             start with --provider auto or --provider memfd"
        }
        ProviderError::Host { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            "; the daemon's user may not open the device: give it access (the \
             device's group, a udev rule; under systemd, DeviceAllow=), or start \
             with --provider memfd"
        }
        _ => "",
    }
}

/// What an operator can do about an `--export` path that would not open.
fn export_open_hint(e: &std::io::Error, read_only: bool) -> &'static str {
    match (e.raw_os_error(), read_only) {
        (Some(libc::EACCES | libc::EPERM | libc::EROFS), false) => {
            "; it is opened read-write: add ,read-only if guests need only read it \
             (under systemd, a path outside /dev needs ReadWritePaths=)"
        }
        (Some(libc::EACCES | libc::EPERM), true) => "; the daemon's user may not read it",
        (Some(libc::ENOENT), _) => "; check the path",
        _ => "",
    }
}

fn register_export(exporter: &mut Exporter, export: &ExportConfig) -> Result<(), DaemonError> {
    let name = export.spec.name.clone();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!export.spec.read_only)
        .open(&export.path)
        .map_err(|source| DaemonError::ExportOpen {
            name: name.clone(),
            path: export.path.clone(),
            hint: export_open_hint(&source, export.spec.read_only),
            source,
        })?;
    let fd = OwnedFd::from(file);
    if !provider::is_dmabuf_fd(&fd) {
        log::info!(
            "export {name:?}: {} is not a dma-buf; its syncs are emulated",
            export.path.display()
        );
    }
    let backing = provider::import_host_fd(fd).map_err(|source| DaemonError::ExportImport {
        name: name.clone(),
        path: export.path.clone(),
        source,
    })?;
    let uuid = exporter
        .host_export(export.spec.clone(), backing)
        .map_err(|source| DaemonError::ExportRegister {
            name: name.clone(),
            source,
        })?;
    log::info!("export {name:?}: {uuid} ({})", export.path.display());
    Ok(())
}

/// The signals that stop [`run`], blocked in the calling thread.
struct StopSignals {
    set: libc::sigset_t,
}

fn block_stop_signals() -> std::io::Result<StopSignals> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set it is given; sigaddset and
    // pthread_sigmask only read the initialized set (and write nothing but
    // the thread's mask); the null old-mask pointer is allowed.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    Ok(StopSignals { set })
}

fn wait_for_signal(signals: &StopSignals) -> std::io::Result<i32> {
    let mut signal = 0;
    // SAFETY: `signals.set` is an initialized signal set and `signal` a
    // valid place for the result.
    let rc = unsafe { libc::sigwait(&signals.set, &mut signal) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(signal)
}
