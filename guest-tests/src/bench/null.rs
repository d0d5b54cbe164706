// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The floor of the benchmark: a vhost-user back-end on the same crates as
//! the daemon (vhost-user-backend, virtio-queue, vm-memory) that does no
//! work of its own. It offers what the loopback VMM asks of the daemon (the
//! same virtio and protocol features, the same config space), and answers
//! every chain of a request queue with a 16-byte OK response header that
//! echoes the request's tag, with the drain loop the daemon uses
//! (EVENT_IDX, one signal per batch). Each request queue has its own
//! worker thread, so two queues are served in parallel.
//!
//! Whatever the daemon costs beyond this back-end is the daemon's own work.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_dmabuf_protocol::{Config, EVENTQ, RESP_HDR_SIZE};
use virtio_queue::QueueOwnedT;
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Where the tag sits in a request header and in a response header.
const TAG_OFFSET: u64 = 8;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The null back-end of one connection.
#[derive(Debug, Clone)]
pub struct NullBackend {
    config: Config,
    memory: Arc<Mutex<Option<Memory>>>,
}

impl NullBackend {
    /// A back-end with `request_queues` request queues (the device has one
    /// more, the eventq), like the daemon's `--queues`.
    pub fn new(request_queues: u32) -> NullBackend {
        NullBackend {
            config: Config {
                num_queues: request_queues + 1,
                page_size: 4096,
                shm_size: 0,
                max_segments: 64,
            },
            memory: Arc::new(Mutex::new(None)),
        }
    }

    fn queues(&self) -> usize {
        self.config.num_queues as usize
    }

    /// Answers every chain on `vring`; true when one went back.
    fn drain(&self, vring: &VringRwLock, mem: &Memory) -> std::io::Result<bool> {
        let mut returned = false;
        loop {
            vring
                .disable_notification()
                .map_err(std::io::Error::other)?;
            loop {
                let guard = mem.memory();
                let chain = {
                    let mut state = vring.get_mut();
                    match state.get_queue_mut().iter(guard.clone()) {
                        Ok(mut iter) => iter.next(),
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut tag = [0u8; 8];
                let mut len = 0;
                let mut read_tag = false;
                for d in chain {
                    if !d.is_write_only() {
                        if !read_tag && d.len() >= 16 {
                            let _ = guard.read_slice(&mut tag, d.addr().unchecked_add(TAG_OFFSET));
                            read_tag = true;
                        }
                    } else if len == 0 && d.len() as usize >= RESP_HDR_SIZE {
                        let mut header = [0u8; RESP_HDR_SIZE];
                        header[8..16].copy_from_slice(&tag);
                        if guard.write_slice(&header, d.addr()).is_ok() {
                            len = RESP_HDR_SIZE as u32;
                        }
                    }
                }
                vring.add_used(head, len).map_err(std::io::Error::other)?;
                returned = true;
            }
            if !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        Ok(returned)
    }
}

impl VhostUserBackend for NullBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues()
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size).unwrap_or_default()
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.memory.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues()).map(|q| 1u64 << q).collect()
    }

    /// With one queue per worker thread, vhost-user-backend gives each
    /// thread only its own vring and numbers events within the thread:
    /// the queue is the thread, and its vring the first of `vrings`.
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if thread_id == usize::from(EVENTQ) || device_event != 0 {
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let Some(mem) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        if self.drain(vring, &mem)? && vring.needs_notification().map_err(std::io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Serves `socket` with a null back-end of `request_queues` request queues,
/// one connection after another, until `connections` ended (`None`: for
/// ever).
pub fn serve(socket: &Path, request_queues: u32, connections: Option<usize>) -> Result<(), String> {
    let mut served = 0;
    while connections.is_none_or(|n| served < n) {
        let backend = NullBackend::new(request_queues);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("dmabuf-null".into(), backend, mem)
            .map_err(|e| format!("null back-end: {e}"))?;
        let _ = std::fs::remove_file(socket);
        daemon
            .serve(socket)
            .map_err(|e| format!("null back-end on {}: {e}", socket.display()))?;
        served += 1;
    }
    Ok(())
}
