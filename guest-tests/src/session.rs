// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A guest's session with the device, whatever carries it: the loopback
//! VMM in this process, or a real VMM whose guest drives the device over
//! virtio-pci from user space ([`crate::pci`]).
//!
//! The scenarios and the importer programs are written against
//! [`Session`]; what only the loopback VMM can show (its end of the
//! back-end channel, vring stops, reconnects) stays on [`LoopbackVmm`] and
//! is reached through [`Session::loopback`], so a scenario that needs it
//! skips on a real front-end with the reason.

use std::fmt;
use std::path::PathBuf;

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_dmabuf_protocol::{Config, CONFIG_SIZE};

use crate::driver::Driver;
use crate::vmm::{LoopbackVmm, VmmError, VmmOptions};

/// A failure of the transport under a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl SessionError {
    pub fn transport(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SessionError::Transport {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// What the front-end gave this guest, as far as the guest can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Bytes of shared memory region 0 the guest reaches (0: no region).
    /// Nonzero only where the front-end acked SHMEM with the back-end
    /// channel and shows the region to the guest.
    pub shm_size: u64,
    /// Whether the front-end acked SHARED_OBJECT with the back-end
    /// channel; `None` where the guest cannot see it (a real VMM), so only
    /// `GET_INFO` tells.
    pub shared_object: Option<bool>,
    /// Queues the transport offers (`config.num_queues` must equal it).
    pub queue_num: u64,
    /// Bytes of the device configuration space the guest sees: 24, or 8
    /// when the device is presented as a stand-in with a smaller window.
    pub config_window: u32,
}

/// One guest's session with the device.
pub trait Session: fmt::Debug + Send {
    /// The driver on this session's memory and queues.
    fn driver(&self) -> &Driver;

    /// What the front-end gave the guest.
    fn capabilities(&self) -> Capabilities;

    /// Reads `size` bytes of the configuration space at `offset`, as the
    /// guest sees it (bytes past the device's structure read as zero).
    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, SessionError>;

    /// One past the highest guest-physical RAM address.
    fn ram_end(&self) -> u64;

    /// Reads shared memory region 0 at `offset`.
    fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, SessionError>;

    /// Writes shared memory region 0 at `offset`.
    fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), SessionError>;

    /// Resets the device (status 0) and sets it up again: everything the
    /// guest held is released, the driver is new.
    fn reset(&mut self) -> Result<(), SessionError>;

    /// The loopback VMM, where the session runs over one.
    fn loopback(&self) -> Option<&LoopbackVmm> {
        None
    }

    /// The loopback VMM, mutably.
    fn loopback_mut(&mut self) -> Option<&mut LoopbackVmm> {
        None
    }

    /// Ends the session as a guest going away does: a disconnect where the
    /// front-end is ours, a device reset from inside a real guest.
    fn end(self: Box<Self>);
}

impl Session for LoopbackVmm {
    fn driver(&self) -> &Driver {
        LoopbackVmm::driver(self)
    }

    fn capabilities(&self) -> Capabilities {
        let n = self.negotiated();
        let channel = n.protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ);
        Capabilities {
            shm_size: if channel && self.shm().is_some() {
                n.shm_size
            } else {
                0
            },
            shared_object: Some(
                channel
                    && n.protocol
                        .contains(VhostUserProtocolFeatures::SHARED_OBJECT),
            ),
            queue_num: n.queue_num,
            config_window: CONFIG_SIZE as u32,
        }
    }

    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, SessionError> {
        Ok(self.get_config(offset, size)?)
    }

    fn ram_end(&self) -> u64 {
        self.options()
            .ram
            .iter()
            .map(|&(g, s)| g + s)
            .max()
            .unwrap_or(0)
    }

    fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, SessionError> {
        Ok(LoopbackVmm::shm_read(self, offset, len)?)
    }

    fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), SessionError> {
        Ok(LoopbackVmm::shm_write(self, offset, data)?)
    }

    fn reset(&mut self) -> Result<(), SessionError> {
        Ok(LoopbackVmm::reset(self)?)
    }

    fn loopback(&self) -> Option<&LoopbackVmm> {
        Some(self)
    }

    fn loopback_mut(&mut self) -> Option<&mut LoopbackVmm> {
        Some(self)
    }

    fn end(self: Box<Self>) {
        self.disconnect();
    }
}

/// The device configuration as a session reads it: the whole structure,
/// or as much of it as the window shows (the rest zero).
pub fn read_device_config(session: &mut dyn Session) -> Result<Config, SessionError> {
    let window = session.capabilities().config_window.min(CONFIG_SIZE as u32);
    let mut bytes = session.read_config(0, window)?;
    bytes.resize(CONFIG_SIZE, 0);
    Config::from_bytes(&bytes)
        .ok_or_else(|| SessionError::Unsupported("config space too short".into()))
}

/// Where sessions come from: how many guests there are and how to open a
/// session as one of them.
pub trait FrontEnd: fmt::Debug + Send + Sync {
    /// What the front-end is, for reports.
    fn describe(&self) -> String;

    /// How many guests (devices) a scenario may use.
    fn guests(&self) -> usize;

    /// A fresh session as guest `guest` with `options`. A front-end that
    /// cannot present what `options` ask for says why with
    /// [`SessionError::Unsupported`].
    fn connect(&self, guest: usize, options: &VmmOptions)
        -> Result<Box<dyn Session>, SessionError>;

    /// The vhost-user socket of guest `guest`, where this process plays the
    /// front-end itself.
    fn loopback_socket(&self, _guest: usize) -> Option<PathBuf> {
        None
    }
}

/// The loopback VMM on the daemon's sockets: guest `i` is socket `i`.
#[derive(Debug, Clone)]
pub struct Loopback {
    pub sockets: Vec<PathBuf>,
}

impl FrontEnd for Loopback {
    fn describe(&self) -> String {
        format!("loopback VMM on {} socket(s)", self.sockets.len())
    }

    fn guests(&self) -> usize {
        self.sockets.len()
    }

    fn connect(
        &self,
        guest: usize,
        options: &VmmOptions,
    ) -> Result<Box<dyn Session>, SessionError> {
        let socket = self
            .loopback_socket(guest)
            .ok_or_else(|| SessionError::Unsupported(format!("no socket for guest {guest}")))?;
        Ok(Box::new(LoopbackVmm::connect(socket, options.clone())?))
    }

    fn loopback_socket(&self, guest: usize) -> Option<PathBuf> {
        self.sockets.get(guest).cloned()
    }
}

/// A boxed session is a session, so `&Box<dyn Session>` passes where
/// `&dyn Session` is asked for.
impl<S: Session + ?Sized> Session for Box<S> {
    fn driver(&self) -> &Driver {
        (**self).driver()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, SessionError> {
        (**self).read_config(offset, size)
    }
    fn ram_end(&self) -> u64 {
        (**self).ram_end()
    }
    fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, SessionError> {
        (**self).shm_read(offset, len)
    }
    fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), SessionError> {
        (**self).shm_write(offset, data)
    }
    fn reset(&mut self) -> Result<(), SessionError> {
        (**self).reset()
    }
    fn loopback(&self) -> Option<&LoopbackVmm> {
        (**self).loopback()
    }
    fn loopback_mut(&mut self) -> Option<&mut LoopbackVmm> {
        (**self).loopback_mut()
    }
    fn end(self: Box<Self>) {
        (*self).end();
    }
}
