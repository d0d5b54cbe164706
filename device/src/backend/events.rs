// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The eventq (section 8): one event per driver-posted buffer.
//!
//! Events wait in the model (bounded, with OVERFLOW) until the driver posts
//! buffers. A buffer is taken from the avail ring only when an event is
//! pending; a buffer shorter than an event is returned with `used.len = 0`
//! and the event stays for the next one.
//!
//! Like the request queues, the eventq is written only with the
//! connection's chain table locked, so a vring stop (`GET_VRING_BASE`)
//! never sees a buffer taken before it and returned after its answer.

use std::io::Write;

use vhost_user_backend::VringT;
use virtio_dmabuf_protocol::{EVENTQ, EVENT_SIZE};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use super::DmabufBackend;

impl DmabufBackend {
    /// Moves pending events into posted eventq buffers.
    pub(super) fn deliver_events(&self) {
        if !self.state.lock().has_events(self.guest) {
            return;
        }
        // Section 8: a move re-places the window mapping before MOVE_NOTIFY.
        // The model queued the channel messages of whatever raised these
        // events before the events themselves; wait (holding no lock) until
        // the front-end has handled every message posted so far, so the
        // driver never reads the window between the event and the re-map.
        if let Some(channel) = self.link.channel() {
            let posted = channel.posted();
            if !channel.wait(posted, self.settings.channel_wait) {
                log::warn!(
                    "guest {}: back-end channel did not catch up in {:?}; delivering events anyway",
                    self.guest,
                    self.settings.channel_wait
                );
            }
        }
        let Some(vring) = self.vring(EVENTQ) else {
            return;
        };
        let vring = &vring;
        let Some(memory) = self.memory() else {
            return;
        };
        let mem = memory.memory();
        let _chains = self.chains();
        let mut used = false;
        loop {
            let chain = {
                let mut state = vring.get_mut();
                if !state.get_queue().ready() || !state.is_enabled() {
                    break;
                }
                state.get_queue_mut().pop_descriptor_chain(mem.clone())
            };
            let Some(chain) = chain else {
                // No buffer: the driver's next one kicks us (and a buffer
                // that raced in is taken now).
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let writer = chain
                .writer(&mem)
                .ok()
                .filter(|w| w.available_bytes() >= EVENT_SIZE);
            let Some(mut writer) = writer else {
                if let Err(e) = vring.add_used(head, 0) {
                    log::warn!("guest {}: eventq add_used({head}): {e}", self.guest);
                }
                used = true;
                continue;
            };
            let event = self.state.lock().pop_event(self.guest);
            let Some(event) = event else {
                // Nothing after all (a reset cleared it): the buffer stays
                // the driver's, unused.
                vring.get_mut().get_queue_mut().go_to_previous_position();
                break;
            };
            let len = match writer.write_all(&event.to_bytes()) {
                Ok(()) => EVENT_SIZE as u32,
                Err(e) => {
                    log::warn!("guest {}: eventq write: {e}", self.guest);
                    0
                }
            };
            if let Err(e) = vring.add_used(head, len) {
                log::warn!("guest {}: eventq add_used({head}): {e}", self.guest);
            }
            used = true;
            if !self.state.lock().has_events(self.guest) {
                break;
            }
        }
        if used {
            self.signal(vring);
        }
    }
}
