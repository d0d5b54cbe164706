// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One guest socket's listener thread: waits for a front-end, serves the
//! connection with a fresh `VhostUserDaemon` and [`DmabufBackend`] through
//! the relay, and, when the front-end hangs up, releases the guest and
//! accepts the next one (section 6). The daemon (`daemon.rs`) binds the
//! sockets and starts one [`Socket`] thread per guest.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::relay::{ConnectionInfo, InternalEndpoint, Relay};
use crate::backend::{BackendSettings, DmabufBackend};
use crate::exporter::GuestId;
use crate::state::DeviceState;

/// What the listener threads share with the handle.
pub(crate) struct Shared {
    pub(crate) stopping: AtomicBool,
    /// Readable once stopping: wakes the listeners' poll.
    pub(crate) stop_event: EventFd,
    /// The live connection of each guest, to hang it up on stop.
    pub(crate) connections: Mutex<Vec<Option<ShutdownHandle>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// One guest socket's listener thread.
pub(crate) struct Socket {
    pub(crate) guest: GuestId,
    /// The directory of the guest's socket: where the relay's private
    /// endpoint goes when the temporary directory cannot hold it.
    pub(crate) socket_dir: Option<PathBuf>,
    pub(crate) state: Arc<DeviceState>,
    pub(crate) settings: Arc<BackendSettings>,
    pub(crate) shared: Arc<Shared>,
}

/// What [`Socket::wait_for_front_end`] saw.
enum Wake {
    Connection,
    Stop,
}

impl Socket {
    pub(crate) fn serve(self, mut listener: Listener) {
        loop {
            match self.wait_for_front_end(&listener) {
                Ok(Wake::Connection) => {}
                Ok(Wake::Stop) => break,
                Err(e) => {
                    log::error!("guest {}: polling the socket: {e}", self.guest);
                    break;
                }
            }
            if let Err(e) = self.serve_connection(&mut listener) {
                log::error!("guest {}: {e}", self.guest);
                // Do not spin on a persistent failure (e.g. out of fds).
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.shared.stopping() {
                break;
            }
        }
        // Dropping the listener removes the socket file.
        drop(listener);
    }

    /// Blocks until a front-end connects or the daemon stops.
    fn wait_for_front_end(&self, listener: &Listener) -> std::io::Result<Wake> {
        loop {
            if self.shared.stopping() {
                return Ok(Wake::Stop);
            }
            // SAFETY: both fds belong to objects (`listener`, `self.shared`)
            // that outlive these borrows, which end with this iteration.
            let (listen_fd, stop_fd) = unsafe {
                (
                    std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()),
                    std::os::fd::BorrowedFd::borrow_raw(self.shared.stop_event.as_raw_fd()),
                )
            };
            let mut fds = [
                PollFd::new(&listen_fd, PollFlags::IN),
                PollFd::new(&stop_fd, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if !fds[1].revents().is_empty() || self.shared.stopping() {
                return Ok(Wake::Stop);
            }
            if !fds[0].revents().is_empty() {
                return Ok(Wake::Connection);
            }
        }
    }

    fn serve_connection(&self, listener: &mut Listener) -> Result<(), String> {
        let guest = self.guest;
        let front = match listener.accept() {
            Ok(Some(front)) => front,
            // The front-end went away before we took it.
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("accepting a front-end: {e}")),
        };
        let connected = Instant::now();
        let info = Arc::new(ConnectionInfo::default());
        let backend = Arc::new(DmabufBackend::new(
            guest,
            Arc::clone(&self.state),
            Arc::clone(&self.settings),
            Arc::clone(&info),
        ));
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(format!("dmabuf-vhost{guest}"), Arc::clone(&backend), memory)
                .map_err(|e| format!("creating the vhost-user daemon: {e}"))?;
        if let Some(wake) = self.state.guest_wake(guest) {
            // The first worker delivers completions and events
            // (`worker_queues`); the others only serve their queue.
            for handler in daemon.get_epoll_handlers().iter().take(1) {
                handler
                    .register_listener(
                        wake.as_raw_fd(),
                        EventSet::IN,
                        u64::from(backend.wake_event()),
                    )
                    .map_err(|e| format!("registering the wake-up eventfd: {e}"))?;
            }
        }
        {
            let mut ex = self.state.lock();
            ex.connect(guest, backend.caps(), backend.frontend());
            self.state.changed(&ex);
        }
        let relay = self.attach(&mut daemon, front, &info);
        let result = match relay {
            Ok(relay) => {
                log::info!("guest {guest}: front-end connected");
                self.publish(daemon.shutdown_handle());
                let waited = daemon.wait();
                self.publish(None);
                relay.stop();
                match waited {
                    Ok(()) => Ok(()),
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => Ok(()),
                    Err(e) => Err(format!("connection ended: {e}")),
                }
            }
            Err(e) => {
                daemon.request_shutdown();
                let _ = daemon.wait();
                Err(e)
            }
        };
        // Workers may wait on the back-end channel: release them, then stop
        // them (dropping the daemon joins them), then release the guest.
        backend.connection_ended();
        drop(daemon);
        backend.disconnected();
        log::info!(
            "guest {guest}: front-end disconnected after {:.1?} ({}); state released",
            connected.elapsed(),
            backend.summary()
        );
        result
    }

    /// Hands the connection to `daemon` through the relay. The daemon
    /// connects to a private endpoint, whose accept takes only a connection
    /// of this process (`relay.rs`).
    fn attach(
        &self,
        daemon: &mut VhostUserDaemon<Arc<DmabufBackend>>,
        front: std::os::unix::net::UnixStream,
        info: &Arc<ConnectionInfo>,
    ) -> Result<Relay, String> {
        let guest = self.guest;
        let temp = std::env::temp_dir();
        let mut bases = vec![temp.as_path()];
        if let Some(dir) = self.socket_dir.as_deref() {
            bases.push(dir);
        }
        let endpoint =
            InternalEndpoint::new(&bases).map_err(|e| format!("internal socket: {e}"))?;
        let path = endpoint
            .path()
            .to_str()
            .ok_or_else(|| format!("internal socket path {:?}", endpoint.path()))?;
        daemon
            .start_client(path)
            .map_err(|e| format!("starting the connection: {e}"))?;
        let back = endpoint
            .accept_own()
            .map_err(|e| format!("internal socket: {e}"))?;
        drop(endpoint);
        Relay::start(
            front,
            back,
            Arc::clone(info),
            &format!("dmabuf-relay{guest}"),
        )
        .map_err(|e| format!("starting the relay: {e}"))
    }

    /// Records (or clears) the live connection's shutdown handle; hangs it
    /// up at once if the daemon is already stopping.
    fn publish(&self, handle: Option<ShutdownHandle>) {
        let mut connections = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = connections.get_mut(self.guest) {
            if self.shared.stopping() {
                if let Some(h) = &handle {
                    h.shutdown();
                }
            }
            *slot = handle;
        }
    }
}
