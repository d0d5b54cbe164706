// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the model asks of one guest's VMM front-end ([`Frontend`]), done
//! over vhost-user: the back-end channel for the shared memory window and
//! shared objects, the front-end's memory table for guest pages.
//!
//! The model calls these hooks with its lock held, so none of them waits
//! for the front-end: messages are only queued on the [`Channel`] (section
//! 1). A `LOOKUP` needs its answer, so the vring worker asks the front-end
//! before it submits `OPEN` BY_UUID, without the lock, and leaves the fd
//! here ([`Link::stash_lookup`]) for [`Frontend::shared_object_lookup`].

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_dmabuf_protocol::{Segment, Status};

use crate::backend::channel::{Channel, ChannelError, Message};
use crate::backend::guest_memory::{guest_pages_backing, GuestRamHandle};
use crate::exporter::{Frontend, GuestId};
use crate::provider::{Backing, UdmabufProvider};
use crate::state::lock_order::{Ordered, Rank};

/// A leaf of the daemon's lock order (`state.rs`, `# Locking`).
fn locked<T>(m: &Mutex<T>) -> Ordered<'_, T> {
    Ordered::new(m.lock().unwrap_or_else(PoisonError::into_inner), Rank::Leaf)
}

/// What one connection shares between its vhost-user hooks, its vring
/// worker and the [`VhostFrontend`] inside the model.
///
/// Its locks are leaves of the daemon's lock order (`state.rs`,
/// `# Locking`).
#[derive(Debug, Default)]
pub struct Link {
    channel: Mutex<Option<Arc<Channel>>>,
    /// Counts the channels installed ([`Link::set_channel`]), so a worker
    /// can keep the channel between requests and see when it changed.
    channel_generation: AtomicU64,
    memory: Mutex<Option<GuestRamHandle>>,
    lookups: Mutex<HashMap<[u8; 16], Result<OwnedFd, Status>>>,
    udmabuf: Option<Arc<UdmabufProvider>>,
    /// The front-end went away: its window and its shared object table
    /// went with it, so removing things from them trivially succeeds.
    gone: AtomicBool,
}

impl Link {
    /// `udmabuf`: the daemon's `/dev/udmabuf`, if the host has one, for
    /// guest pages that can become real dma-bufs.
    pub fn new(udmabuf: Option<Arc<UdmabufProvider>>) -> Self {
        Link {
            udmabuf,
            ..Link::default()
        }
    }

    pub fn channel(&self) -> Option<Arc<Channel>> {
        locked(&self.channel).clone()
    }

    /// The channel, with the generation it was installed as.
    pub fn channel_with_generation(&self) -> (u64, Option<Arc<Channel>>) {
        let channel = locked(&self.channel);
        (
            self.channel_generation.load(Ordering::Acquire),
            channel.clone(),
        )
    }

    /// The generation of the channel installed now (no lock taken).
    pub fn channel_generation(&self) -> u64 {
        self.channel_generation.load(Ordering::Acquire)
    }

    /// The connection ended: the channel closes (waiters wake at once) and
    /// removals succeed without a message.
    pub fn mark_gone(&self) {
        self.gone.store(true, Ordering::Release);
        if let Some(c) = self.set_channel(None) {
            c.close();
        }
    }

    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Installs the back-end channel; returns the one it replaces.
    pub fn set_channel(&self, channel: Option<Arc<Channel>>) -> Option<Arc<Channel>> {
        let mut slot = locked(&self.channel);
        let old = std::mem::replace(&mut *slot, channel);
        self.channel_generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    pub fn memory(&self) -> Option<GuestRamHandle> {
        locked(&self.memory).clone()
    }

    pub fn set_memory(&self, memory: GuestRamHandle) {
        *locked(&self.memory) = Some(memory);
    }

    /// The outcome of a `LOOKUP` the worker did for an `OPEN` it is about
    /// to submit.
    pub fn stash_lookup(&self, uuid: [u8; 16], result: Result<OwnedFd, Status>) {
        locked(&self.lookups).insert(uuid, result);
    }

    /// Drops a stashed `LOOKUP` the model did not use.
    pub fn clear_lookup(&self, uuid: &[u8; 16]) {
        locked(&self.lookups).remove(uuid);
    }
}

/// A message that could not be queued: the channel is closed or broken.
fn post_status(e: ChannelError) -> Status {
    log::debug!("back-end channel: {e}");
    Status::Io
}

/// [`Frontend`] over vhost-user for one guest.
#[derive(Debug)]
pub struct VhostFrontend {
    guest: GuestId,
    link: Arc<Link>,
}

impl VhostFrontend {
    pub fn new(guest: GuestId, link: Arc<Link>) -> Self {
        VhostFrontend { guest, link }
    }

    fn channel(&self) -> Result<Arc<Channel>, Status> {
        self.link.channel().ok_or(Status::NotSupported)
    }
}

impl Frontend for VhostFrontend {
    fn shm_map(
        &mut self,
        shm_offset: u64,
        fd: BorrowedFd<'_>,
        len: u64,
        writable: bool,
    ) -> Result<(), Status> {
        let channel = self.channel()?;
        // The message is sent later by the channel thread: it needs its own fd.
        let fd = fd.try_clone_to_owned().map_err(|e| {
            log::warn!("guest {}: dup for SHMEM_MAP: {e}", self.guest);
            Status::NoMem
        })?;
        channel
            .post(Message::ShmemMap {
                shm_offset,
                len,
                writable,
                fd,
            })
            .map(drop)
            .map_err(post_status)
    }

    fn shm_unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), Status> {
        if self.link.is_gone() {
            return Ok(());
        }
        self.channel()?
            .post(Message::ShmemUnmap { shm_offset, len })
            .map(drop)
            .map_err(post_status)
    }

    fn shared_object_add(&mut self, uuid: &[u8; 16]) -> Result<(), Status> {
        self.channel()?
            .post(Message::SharedObjectAdd(*uuid))
            .map(drop)
            .map_err(post_status)
    }

    fn shared_object_remove(&mut self, uuid: &[u8; 16]) {
        if self.link.is_gone() {
            return;
        }
        let posted = self
            .channel()
            .ok()
            .map(|c| c.post(Message::SharedObjectRemove(*uuid)));
        if let Some(Err(e)) = posted {
            log::debug!(
                "guest {}: SHARED_OBJECT_REMOVE {} not sent: {e}",
                self.guest,
                uuid::Uuid::from_bytes(*uuid)
            );
        }
    }

    fn shared_object_lookup(&mut self, uuid: &[u8; 16]) -> Result<OwnedFd, Status> {
        // Filled by the worker before it submitted the OPEN; a missing entry
        // means nothing was looked up (no channel).
        locked(&self.link.lookups)
            .remove(uuid)
            .unwrap_or(Err(Status::NotSupported))
    }

    fn guest_pages(&mut self, entries: &[Segment]) -> Result<Box<dyn Backing>, Status> {
        let memory = self.link.memory().ok_or(Status::Fault)?;
        guest_pages_backing(&memory, entries, self.link.udmabuf.as_deref())
    }
}
