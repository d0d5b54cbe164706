//! The request queues (controlq and controlq2..): descriptor chains in,
//! typed requests to the model, responses out (sections 2 and 4).
//!
//! Each chain is decoded once ([`parse_request`]) from the bytes of its
//! readable part, read with a [`Reader`] so a header may span descriptors.
//! Every chain taken from the avail ring goes back to the used ring exactly
//! once: at once with its response, with `used.len = 0` when its writable
//! part cannot hold a response header, or later, when a parked request
//! completes, from the writable descriptors remembered for it
//! ([`ParkedChain`]). A bad chain never stops the batch.
//!
//! A vring stop (`GET_VRING_BASE`) cancels the ring's parked requests from
//! the vhost-user thread. A request popped just before the stop may park
//! just after it; the stop generation catches that: a request that parks
//! while its queue's generation moved since the batch began is cancelled
//! at once.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Instant;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_dmabuf_protocol::{
    encode_response, parse_request, Opcode, Reply, Request, RequestHeader, Response, Status,
    REQ_HDR_SIZE, RESP_HDR_SIZE, SEGMENT_SIZE,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::channel::{ChannelError, MessageKind};
use super::{locked, DmabufBackend, TRANSFER_MAX};
use crate::exporter::Origin;
use crate::guest_memory::GuestRam;

/// A chain whose request waits in the model.
#[derive(Debug, Clone)]
pub(crate) struct ParkedChain {
    pub queue: u16,
    pub head: u16,
    /// The writable descriptors (guest address, length), in order.
    pub writable: Vec<(GuestAddress, u32)>,
}

/// What one chain gets now.
enum Outcome {
    /// Write these bytes (a response) to the writable part.
    Respond(Vec<u8>),
    /// The request waits; its chain comes back with the completion.
    Parked,
}

fn respond(tag: u64, response: &Response) -> Outcome {
    Outcome::Respond(encode_response(tag, response))
}

/// How many readable bytes a request of `opcode` can use: its header and
/// payload, plus `CREATE` entries or `TRANSFER_TO_HOST` data. Bytes past
/// that are never read (section 4: they are ignored).
fn readable_bound(header: Option<&RequestHeader>, max_segments: u32) -> usize {
    let Some(opcode) = header.and_then(|h| Opcode::from_u32(h.opcode)) else {
        return REQ_HDR_SIZE;
    };
    let tail = match opcode {
        Opcode::Create => (max_segments as usize).saturating_mul(SEGMENT_SIZE),
        // One byte past the limit, so an over-long copy is seen as such.
        Opcode::TransferToHost => TRANSFER_MAX as usize + 1,
        _ => 0,
    };
    REQ_HDR_SIZE + opcode.payload_size() + tail
}

/// Limits the daemon adds to the parser's checks (both `EINVAL`, lengths).
fn check_limits(request: &Request) -> Result<(), Status> {
    match request {
        Request::TransferToHost { data, .. } if data.len() as u64 > TRANSFER_MAX => {
            Err(Status::Inval)
        }
        Request::TransferFromHost { len, .. } if *len > TRANSFER_MAX => Err(Status::Inval),
        _ => Ok(()),
    }
}

/// Writes `bytes` over the writable descriptors; returns how many went in.
fn write_segments(mem: &GuestRam, segments: &[(GuestAddress, u32)], bytes: &[u8]) -> u32 {
    let mut done = 0usize;
    for &(addr, len) in segments {
        if done == bytes.len() {
            break;
        }
        let n = (len as usize).min(bytes.len() - done);
        if mem.write_slice(&bytes[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    u32::try_from(done).unwrap_or(u32::MAX)
}

impl DmabufBackend {
    /// Serves one request queue: the EVENT_IDX drain loop (disable
    /// notifications, take every available chain, re-enable, repeat while
    /// more arrived), then one signal for the batch.
    pub(super) fn serve_queue(&self, queue: u16, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(usize::from(queue)) else {
            return;
        };
        let Some(memory) = self.memory() else {
            return;
        };
        let generation = self
            .stop_generation
            .get(usize::from(queue))
            .map_or(0, |g| g.load(Ordering::Acquire));
        let mut used = false;
        loop {
            if let Err(e) = vring.disable_notification() {
                log::debug!("guest {}: queue {queue}: {e}", self.guest);
            }
            let mem = memory.memory();
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(mem.clone()) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        log::debug!("guest {}: queue {queue} not ready: {e}", self.guest);
                        Vec::new()
                    }
                }
            };
            for chain in chains {
                let head = chain.head_index();
                if let Some(len) = self.serve_chain(queue, chain, &mem, generation) {
                    if let Err(e) = vring.add_used(head, len) {
                        log::warn!("guest {}: queue {queue}: add_used({head}): {e}", self.guest);
                    }
                    used = true;
                }
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::debug!("guest {}: queue {queue}: {e}", self.guest);
                    break;
                }
            }
        }
        if used {
            self.signal(vring);
        }
    }

    /// One chain: `Some(used.len)` to return it now, `None` when parked.
    fn serve_chain<M>(
        &self,
        queue: u16,
        chain: DescriptorChain<M>,
        mem: &GuestRam,
        generation: u64,
    ) -> Option<u32>
    where
        M: std::ops::Deref<Target = GuestRam> + Clone,
    {
        let mut writer = match chain.clone().writer(mem) {
            Ok(w) => w,
            Err(e) => {
                // No place for a response: used.len = 0 (section 4).
                log::debug!("guest {}: queue {queue}: writable part: {e}", self.guest);
                return Some(0);
            }
        };
        let room = writer.available_bytes();
        if room < RESP_HDR_SIZE {
            return Some(0);
        }
        let outcome = match self.read_request(&chain, mem) {
            Ok(bytes) => self.run_request(queue, &chain, &bytes, room, generation),
            // A readable part outside guest memory (section 4).
            Err(status) => respond(0, &Err(status)),
        };
        match outcome {
            Outcome::Parked => None,
            Outcome::Respond(bytes) => {
                let n = bytes.len().min(room);
                if let Err(e) = writer.write_all(&bytes[..n]) {
                    log::debug!("guest {}: queue {queue}: response: {e}", self.guest);
                }
                Some(u32::try_from(writer.bytes_written()).unwrap_or(u32::MAX))
            }
        }
    }

    /// The readable bytes the request can use (bounded by its opcode).
    fn read_request<M>(&self, chain: &DescriptorChain<M>, mem: &GuestRam) -> Result<Vec<u8>, Status>
    where
        M: std::ops::Deref<Target = GuestRam> + Clone,
    {
        let mut reader = chain.clone().reader(mem).map_err(|_| Status::Fault)?;
        let available = reader.available_bytes();
        let mut bytes = vec![0u8; available.min(REQ_HDR_SIZE)];
        reader.read_exact(&mut bytes).map_err(|_| Status::Fault)?;
        let bound = readable_bound(
            RequestHeader::from_bytes(&bytes).as_ref(),
            self.settings.max_segments,
        );
        let more = available.min(bound).saturating_sub(bytes.len());
        if more > 0 {
            let start = bytes.len();
            bytes.try_reserve_exact(more).map_err(|_| Status::NoMem)?;
            bytes.resize(start + more, 0);
            reader
                .read_exact(&mut bytes[start..])
                .map_err(|_| Status::Fault)?;
        }
        Ok(bytes)
    }

    fn run_request<M>(
        &self,
        queue: u16,
        chain: &DescriptorChain<M>,
        readable: &[u8],
        room: usize,
        generation: u64,
    ) -> Outcome
    where
        M: std::ops::Deref<Target = GuestRam> + Clone,
    {
        let (header, request) = match parse_request(readable, room) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::debug!("guest {}: queue {queue}: {e}", self.guest);
                return respond(e.tag.unwrap_or(0), &Err(e.status));
            }
        };
        let tag = header.tag;
        if let Err(status) = check_limits(&request) {
            return respond(tag, &Err(status));
        }
        let opcode = request.opcode();
        let map_shm_handle = match &request {
            Request::MapShm { object, .. } => Some(*object),
            _ => None,
        };
        let looked_up = self.look_up_for_open(&request);

        // Remembered before the model sees it: a vring stop on another
        // thread may complete it before `submit` returns here.
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let writable = chain
            .clone()
            .writable()
            .map(|d| (d.addr(), d.len()))
            .collect();
        locked(&self.parked).insert(
            token,
            ParkedChain {
                queue,
                head: chain.head_index(),
                writable,
            },
        );

        let channel = self.link.channel();
        let (response, posted) = {
            let mut ex = self.state.lock();
            let now = Instant::now();
            let before = channel.as_ref().map_or(0, |c| c.posted());
            let response = ex.submit(self.guest, Origin { queue, token }, tag, request, now);
            if response.is_none() && self.queue_stopped_since(queue, generation) {
                ex.cancel_queue(self.guest, queue, now);
            }
            let after = channel.as_ref().map_or(0, |c| c.posted());
            self.state.changed(&ex);
            (response, (before, after))
        };
        if let Some(uuid) = looked_up {
            self.link.clear_lookup(&uuid);
        }
        let Some(mut response) = response else {
            return Outcome::Parked;
        };
        locked(&self.parked).remove(&token);

        // What the model asked of the front-end must be done before the
        // guest hears the answer (a MAP_SHM'd window must be mapped).
        if let Some(channel) = channel.filter(|_| posted.1 > posted.0) {
            if !channel.wait(posted.1, self.settings.channel_wait) {
                log::warn!(
                    "guest {}: front-end did not answer the back-end channel within {:?}",
                    self.guest,
                    self.settings.channel_wait
                );
            }
            for (kind, why) in channel.take_failures(posted.0, posted.1) {
                response = self.front_end_refused(opcode, map_shm_handle, kind, &why, response);
            }
        }
        respond(tag, &response)
    }

    fn queue_stopped_since(&self, queue: u16, generation: u64) -> bool {
        self.stop_generation
            .get(usize::from(queue))
            .is_some_and(|g| g.load(Ordering::Acquire) != generation)
    }

    /// A back-end channel message of this request failed: the guest hears
    /// `EIO` where its request depended on it, and the model forgets what
    /// did not happen.
    fn front_end_refused(
        &self,
        opcode: Opcode,
        map_shm_handle: Option<u64>,
        kind: MessageKind,
        why: &str,
        response: Response,
    ) -> Response {
        log::warn!("guest {}: {opcode}: front-end: {why}", self.guest);
        match (opcode, kind, &response) {
            (Opcode::MapShm, MessageKind::ShmemMap, Ok(_)) => {
                if let Some(handle) = map_shm_handle {
                    self.state.lock().shm_map_refused(self.guest, handle);
                }
                Err(Status::Io)
            }
            (Opcode::ExportUuid, MessageKind::SharedObjectAdd, Ok(Reply::Uuid(uuid))) => {
                self.state.lock().unpublish(self.guest, uuid);
                Err(Status::Io)
            }
            _ => response,
        }
    }

    /// `OPEN` BY_UUID of a UUID this back-end does not know: ask the
    /// front-end (`SHARED_OBJECT_LOOKUP`) now, with no lock held, and leave
    /// the answer for the model (section 7.2). Returns the UUID looked up.
    fn look_up_for_open(&self, request: &Request) -> Option<[u8; 16]> {
        let Request::Open {
            uuid: Some(uuid), ..
        } = request
        else {
            return None;
        };
        if !self.caps().shared_objects {
            return None;
        }
        if self.state.lock().resolves_uuid_locally(self.guest, uuid) {
            return None;
        }
        let channel = self.link.channel()?;
        let result = channel
            .lookup(*uuid, self.settings.channel_wait)
            .map_err(|e| match e {
                // The front-end knows no such object.
                ChannelError::Refused { .. } => Status::NoEnt,
                other => {
                    log::warn!(
                        "guest {}: SHARED_OBJECT_LOOKUP {}: {other}",
                        self.guest,
                        uuid::Uuid::from_bytes(*uuid)
                    );
                    Status::Io
                }
            });
        self.link.stash_lookup(*uuid, result);
        Some(*uuid)
    }

    /// Writes the completions of this guest's parked requests to their
    /// chains and returns them, then signals each queue once.
    pub(super) fn deliver_completions(&self) {
        let _order = locked(&self.delivery);
        let completions = {
            let mut ex = self.state.lock();
            ex.take_completions_for(self.guest)
        };
        if completions.is_empty() {
            return;
        }
        let Some(memory) = self.memory() else {
            return;
        };
        let mem = memory.memory();
        let vrings = locked(&self.vrings).clone();
        let mut touched = BTreeSet::new();
        for c in completions {
            let Some(chain) = locked(&self.parked).remove(&c.origin.token) else {
                log::debug!(
                    "guest {}: completion of {} for a chain no longer held",
                    self.guest,
                    c.opcode
                );
                continue;
            };
            let Some(vring) = vrings.get(usize::from(chain.queue)) else {
                continue;
            };
            let bytes = encode_response(c.tag, &c.response);
            let len = write_segments(&mem, &chain.writable, &bytes);
            if let Err(e) = vring.add_used(chain.head, len) {
                log::warn!(
                    "guest {}: queue {}: add_used({}): {e}",
                    self.guest,
                    chain.queue,
                    chain.head
                );
            }
            touched.insert(chain.queue);
        }
        for q in touched {
            if let Some(vring) = vrings.get(usize::from(q)) {
                self.signal(vring);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_bound_follows_the_opcode() {
        let hdr = |opcode: Opcode| RequestHeader {
            opcode: opcode as u32,
            flags: 0,
            tag: 0,
        };
        assert_eq!(readable_bound(None, 8), REQ_HDR_SIZE);
        assert_eq!(
            readable_bound(
                Some(&RequestHeader {
                    opcode: 0xdead,
                    flags: 0,
                    tag: 1
                }),
                8
            ),
            REQ_HDR_SIZE
        );
        assert_eq!(
            readable_bound(Some(&hdr(Opcode::Release)), 8),
            REQ_HDR_SIZE + 8
        );
        assert_eq!(
            readable_bound(Some(&hdr(Opcode::Create)), 8),
            REQ_HDR_SIZE + Opcode::Create.payload_size() + 8 * SEGMENT_SIZE
        );
        assert_eq!(
            readable_bound(Some(&hdr(Opcode::TransferToHost)), 8),
            REQ_HDR_SIZE + Opcode::TransferToHost.payload_size() + TRANSFER_MAX as usize + 1
        );
    }

    #[test]
    fn transfers_above_the_limit_are_einval() {
        let from = Request::TransferFromHost {
            object: 1,
            offset: 0,
            len: TRANSFER_MAX + 1,
        };
        assert_eq!(check_limits(&from), Err(Status::Inval));
        let ok = Request::TransferFromHost {
            object: 1,
            offset: 0,
            len: TRANSFER_MAX,
        };
        assert_eq!(check_limits(&ok), Ok(()));
        let to = Request::TransferToHost {
            object: 1,
            offset: 0,
            data: vec![0; TRANSFER_MAX as usize + 1],
        };
        assert_eq!(check_limits(&to), Err(Status::Inval));
    }

    #[test]
    fn segments_take_the_response_in_order_and_stop_at_a_bad_address() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).expect("mem");
        let segs = [(GuestAddress(0x1000), 4), (GuestAddress(0x1800), 8)];
        assert_eq!(write_segments(&mem, &segs, b"0123456789"), 10);
        let mut a = [0u8; 4];
        mem.read_slice(&mut a, GuestAddress(0x1000)).expect("read");
        assert_eq!(&a, b"0123");
        let mut b = [0u8; 6];
        mem.read_slice(&mut b, GuestAddress(0x1800)).expect("read");
        assert_eq!(&b, b"456789");
        let outside = [(GuestAddress(0x1000), 2), (GuestAddress(0x9000), 8)];
        assert_eq!(write_segments(&mem, &outside, b"abcdef"), 2);
    }
}
