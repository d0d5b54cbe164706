// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The typed client of the device contract on top of the split rings.
//!
//! Every request is one descriptor chain: a device-readable part (request
//! header, payload, data) and a device-writable part (response header,
//! reply, data), section 4. [`Driver::submit`] makes the chain available and
//! returns a [`Ticket`]; completions are collected from the used ring in
//! whatever order the device returns them (a parked request completes
//! later, section 2) and kept until the ticket's owner asks for them with
//! [`Driver::complete`] or [`Driver::poll`]. The blocking methods named
//! after the opcodes (`create`, `map`, `lock`, ...) submit on the controlq
//! and wait.
//!
//! Results nest: the outer `Result` is the transport (memory, ring,
//! timeout, a response that breaks the framing rules), the inner
//! [`Outcome`] is the device's status.
//!
//! [`Driver::submit_raw`] sends any bytes with any descriptor split, for
//! framing tests; its [`RawCompletion`] is the bare `used.len` and bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use virtio_dmabuf_protocol::{
    decode_response, encode_request, DecodeError, Direction, Event, FenceUsage, Info, MapReply,
    ObjectReply, Opcode, Reply, Request, Response, Segment, Status, CONTROLQ, EVENTQ, EVENT_SIZE,
    MAP_REPLY_FIXED_SIZE, REQ_HDR_SIZE, RESP_HDR_SIZE, SEGMENT_SIZE,
};

use super::memory::{Buffer, BufferPool, GuestMemory, MemError, PoolError};
use super::notify::Notifier;
use super::split::{Desc, QueueError, RingLayout, SplitQueue, DESC_SIZE};

mod complete;
mod ops;
mod submit;

/// The device's answer to one request: a reply or its status.
pub type Outcome<T> = Result<T, Status>;

/// Transport failures, and responses that break the framing rules. The
/// device's own statuses are not errors here: they are the inner
/// [`Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("queue {queue}: {source}")]
    Queue {
        queue: u16,
        #[source]
        source: QueueError,
    },
    #[error("queue {0} does not exist or does not take requests")]
    NoSuchQueue(u16),
    #[error("notification on queue {queue}: {source}")]
    Notify {
        queue: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("no completion on queue {queue} within {timeout:?} ({what})")]
    Timeout {
        queue: u16,
        timeout: Duration,
        what: String,
    },
    #[error("ticket {0} was submitted raw and has no opcode to decode with")]
    NotTyped(u64),
    #[error("undecodable response to {opcode}: {source}")]
    Decode {
        opcode: Opcode,
        #[source]
        source: DecodeError,
    },
    #[error("response to {opcode} echoes tag {got:#x}, the request had {expected:#x}")]
    TagMismatch {
        opcode: Opcode,
        expected: u64,
        got: u64,
    },
    #[error("response to {opcode} breaks the contract: {why}")]
    Nonconforming { opcode: Opcode, why: String },
    #[error("{opcode} answered with a reply of the wrong kind: {reply:?}")]
    UnexpectedReply { opcode: Opcode, reply: Box<Reply> },
}

impl DriverError {
    fn queue(queue: u16) -> impl FnOnce(QueueError) -> DriverError {
        move |source| DriverError::Queue { queue, source }
    }
}

/// Geometry of the driver's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// Every queue, eventq included (`config.num_queues`, at least 2).
    pub num_queues: u16,
    /// Ring size of every queue (a power of two).
    pub queue_size: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// How long the blocking calls wait for a completion.
    pub timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            num_queues: 2,
            queue_size: 256,
            event_idx: true,
            indirect: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// How typed requests are cut into descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainLayout {
    /// Largest descriptor; `None` = one descriptor per part.
    pub max_desc_len: Option<u32>,
    /// Largest first descriptor of each part (cuts the request and response
    /// headers, say with 5); `None` = like the others.
    pub first_desc_len: Option<u32>,
    /// Put the chain in an indirect table (needs `DriverConfig::indirect`).
    pub indirect: bool,
}

impl ChainLayout {
    /// Descriptor lengths for a part of `len` bytes (none for 0 bytes).
    pub fn pieces(&self, len: usize) -> Vec<usize> {
        let max = self
            .max_desc_len
            .map_or(u32::MAX as usize, |m| m.max(1) as usize);
        let first = self
            .first_desc_len
            .map_or(max, |f| (f.max(1) as usize).min(max));
        let mut out = Vec::new();
        let mut left = len;
        let mut limit = first;
        while left > 0 {
            let n = left.min(limit);
            out.push(n);
            left -= n;
            limit = max;
        }
        out
    }

    /// This layout with descriptors long enough that a chain of `readable`
    /// and `writable` bytes has at most `budget` of them: a driver must not
    /// make a chain longer than the queue (virtio 1.2, 2.7.5.3.1), and a
    /// front-end may offer short queues (QEMU 10's stand-in has 64
    /// entries). The first descriptor of each part keeps its length, so
    /// headers stay cut where the layout cuts them.
    pub fn within(&self, readable: usize, writable: usize, budget: usize) -> ChainLayout {
        let count = |l: &ChainLayout| l.pieces(readable).len() + l.pieces(writable).len();
        let mut layout = *self;
        while count(&layout) > budget {
            match layout.max_desc_len {
                Some(m) if m < u32::MAX => layout.max_desc_len = Some(m.saturating_mul(2)),
                _ => break,
            }
        }
        layout
    }
}

/// One descriptor of a raw chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawDesc {
    /// Device-readable, over a fresh driver buffer holding these bytes.
    Readable(Vec<u8>),
    /// Device-writable, over a fresh zeroed driver buffer of this length.
    Writable(u32),
    /// A descriptor used as given (an address outside guest memory, say).
    /// The driver does not read its contents back.
    At(Desc),
}

/// Any chain: for framing tests and for requests the typed API cannot say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawChain {
    pub descs: Vec<RawDesc>,
    pub indirect: bool,
    /// The last descriptor says NEXT and links back to the first: a chain
    /// that never ends (a broken or hostile driver).
    pub looped: bool,
}

impl RawChain {
    pub fn new() -> Self {
        RawChain::default()
    }

    pub fn readable(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.descs.push(RawDesc::Readable(bytes.into()));
        self
    }

    pub fn writable(mut self, len: u32) -> Self {
        self.descs.push(RawDesc::Writable(len));
        self
    }

    pub fn at(mut self, desc: Desc) -> Self {
        self.descs.push(RawDesc::At(desc));
        self
    }

    pub fn indirect(mut self, on: bool) -> Self {
        self.indirect = on;
        self
    }

    /// Makes the last descriptor link back to the first.
    pub fn looped(mut self) -> Self {
        self.looped = true;
        self
    }

    /// `bytes` as readable descriptors cut before each offset in `cuts`
    /// (ascending; empty pieces allowed), then one writable descriptor of
    /// each length in `writable`.
    pub fn split(bytes: &[u8], cuts: &[usize], writable: &[u32]) -> Self {
        let mut chain = RawChain::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let cut = cut.clamp(start, bytes.len());
            chain = chain.readable(&bytes[start..cut]);
            start = cut;
        }
        for &len in writable {
            chain = chain.writable(len);
        }
        chain
    }

    /// `readable` bytes and `writable_len` writable bytes cut per `layout`:
    /// in each part the first descriptor holds at most
    /// `layout.first_desc_len` bytes and the others `layout.max_desc_len`.
    pub fn chunked(readable: &[u8], writable_len: usize, layout: &ChainLayout) -> Self {
        let mut chain = RawChain::new().indirect(layout.indirect);
        let mut at = 0;
        for n in layout.pieces(readable.len()) {
            chain = chain.readable(&readable[at..at + n]);
            at += n;
        }
        for n in layout.pieces(writable_len) {
            chain = chain.writable(u32::try_from(n).unwrap_or(u32::MAX));
        }
        chain
    }
}

/// What came back for a chain: `used.len` and the bytes of the writable
/// part it covers (at most what the driver's writable buffers hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCompletion {
    pub used_len: u32,
    pub written: Vec<u8>,
    /// Total bytes of the chain's driver-readable writable buffers.
    pub capacity: usize,
}

/// One used eventq buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub used_len: u32,
    /// The decoded event, if `used_len` covers one and its type is known.
    pub event: Option<Event>,
    pub bytes: Vec<u8>,
}

/// A request in flight. Give it back to [`Driver::complete`] (typed) or
/// [`Driver::complete_raw`]; dropping it abandons the completion.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket is how the completion is collected"]
pub struct Ticket {
    queue: u16,
    seq: u64,
    tag: u64,
    opcode: Option<Opcode>,
}

impl Ticket {
    pub fn queue(&self) -> u16 {
        self.queue
    }
    /// The tag of the request header (what `CANCEL` names).
    pub fn tag(&self) -> u64 {
        self.tag
    }
    pub fn opcode(&self) -> Option<Opcode> {
        self.opcode
    }
}

/// A chain's driver-side resources while the device owns it.
#[derive(Debug)]
struct Inflight {
    seq: u64,
    buffers: Vec<Buffer>,
    /// `(gpa, len)` of the writable buffers to read back, in chain order.
    writable: Vec<(u64, u32)>,
    is_event: bool,
}

#[derive(Debug)]
struct QueueState {
    ring: SplitQueue,
    ring_buffers: [Buffer; 3],
    inflight: HashMap<u16, Inflight>,
    done: HashMap<u64, RawCompletion>,
    abandoned: HashSet<u64>,
    events: VecDeque<RawCompletion>,
}

/// The guest driver: split rings on every queue plus the typed client.
pub struct Driver {
    mem: Arc<dyn GuestMemory>,
    notifier: Arc<dyn Notifier>,
    pool: Arc<BufferPool>,
    config: DriverConfig,
    queues: Vec<Mutex<QueueState>>,
    layout: Mutex<ChainLayout>,
    next_tag: AtomicU64,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Room for the fixed reply and the variable part of `request`'s reply.
/// `MAP` gets room for `min(max_entries, 1024)` entries; ask for more with
/// [`Driver::submit_sized`].
pub fn reply_capacity(request: &Request) -> usize {
    let fixed = RESP_HDR_SIZE + request.opcode().fixed_reply_size();
    match request {
        Request::Map { max_entries, .. } => {
            fixed + (*max_entries).min(1024) as usize * SEGMENT_SIZE
        }
        Request::TransferFromHost { len, .. } => {
            fixed.saturating_add(usize::try_from(*len).unwrap_or(usize::MAX))
        }
        _ => fixed,
    }
}

impl Driver {
    /// Sets up every queue's rings in guest memory (from `pool`). The
    /// transport then tells the device where they are
    /// ([`ring_layouts`](Self::ring_layouts)) and starts it.
    pub fn new(
        mem: Arc<dyn GuestMemory>,
        notifier: Arc<dyn Notifier>,
        pool: Arc<BufferPool>,
        config: DriverConfig,
    ) -> Result<Self, DriverError> {
        let mut queues = Vec::with_capacity(usize::from(config.num_queues));
        for q in 0..config.num_queues {
            let (layout, ring_buffers) = RingLayout::allocate(&pool, config.queue_size)?;
            let ring =
                SplitQueue::new(&*mem, layout, config.event_idx).map_err(DriverError::queue(q))?;
            queues.push(Mutex::new(QueueState {
                ring,
                ring_buffers,
                inflight: HashMap::new(),
                done: HashMap::new(),
                abandoned: HashSet::new(),
                events: VecDeque::new(),
            }));
        }
        Ok(Driver {
            mem,
            notifier,
            pool,
            config,
            queues,
            layout: Mutex::new(ChainLayout::default()),
            next_tag: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> DriverConfig {
        self.config
    }

    /// The guest memory the driver works in.
    pub fn memory(&self) -> &Arc<dyn GuestMemory> {
        &self.mem
    }

    /// The pool buffers come from (guest-placed objects allocate here too).
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// Where each queue's rings are, by queue index.
    pub fn ring_layouts(&self) -> Vec<RingLayout> {
        self.queues.iter().map(|q| lock(q).ring.layout()).collect()
    }

    /// Gives `queue` fresh, empty rings (after the transport stopped it):
    /// the chains it had in flight are dropped with their buffers, and
    /// their tickets never complete. Returns where the new rings are, for
    /// the transport to tell the device.
    pub fn restart_queue(&self, queue: u16) -> Result<RingLayout, DriverError> {
        let qm = self.queue(queue)?;
        let (layout, ring_buffers) = RingLayout::allocate(&self.pool, self.config.queue_size)?;
        let ring = SplitQueue::new(&*self.mem, layout, self.config.event_idx)
            .map_err(DriverError::queue(queue))?;
        let mut q = lock(qm);
        let old_rings = std::mem::replace(&mut q.ring_buffers, ring_buffers);
        q.ring = ring;
        let inflight: Vec<Inflight> = q.inflight.drain().map(|(_, i)| i).collect();
        q.done.clear();
        q.abandoned.clear();
        q.events.clear();
        drop(q);
        for i in inflight {
            self.free_buffers(i.buffers);
        }
        for b in old_rings {
            self.pool.free(b);
        }
        Ok(layout)
    }

    /// The request queues: controlq (0), then 2.. (section 2).
    pub fn request_queues(&self) -> Vec<u16> {
        (0..self.config.num_queues)
            .filter(|&q| q != EVENTQ)
            .collect()
    }

    /// Cut typed requests into descriptors this way from now on.
    pub fn set_chain_layout(&self, layout: ChainLayout) {
        *lock(&self.layout) = layout;
    }

    pub fn chain_layout(&self) -> ChainLayout {
        *lock(&self.layout)
    }

    /// Chains in flight on `queue` (a parked request counts).
    pub fn in_flight(&self, queue: u16) -> usize {
        self.queues
            .get(usize::from(queue))
            .map_or(0, |q| lock(q).inflight.len())
    }

    fn queue(&self, queue: u16) -> Result<&Mutex<QueueState>, DriverError> {
        self.queues
            .get(usize::from(queue))
            .ok_or(DriverError::NoSuchQueue(queue))
    }

    /// A fresh tag (never 0).
    pub fn next_tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }
}

/// A `LOCK` request from `lock_flags` bits.
/// A `BEGIN_CPU_ACCESS` request (to submit without waiting for it).
pub fn begin_cpu_access_request(object: u64, dir: Direction) -> Request {
    Request::BeginCpuAccess { object, dir }
}

pub fn lock_request(ctx: u64, object: u64, flags: u32) -> Request {
    use virtio_dmabuf_protocol::lock_flags as f;
    Request::Lock {
        ctx,
        object,
        try_lock: flags & f::TRY != 0,
        slow: flags & f::SLOW != 0,
    }
}

impl Drop for Driver {
    /// Gives the rings and in-flight buffers back to the pool. The
    /// transport must have stopped the device first (vring stop, reset or
    /// disconnect): nothing may still write them.
    fn drop(&mut self) {
        for qm in &self.queues {
            let mut q = lock(qm);
            let inflight: Vec<Inflight> = q.inflight.drain().map(|(_, i)| i).collect();
            for i in inflight {
                self.free_buffers(i.buffers);
            }
            for b in q.ring_buffers {
                self.pool.free(b);
            }
        }
    }
}

/// One item of [`Driver::submit_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    pub chain: RawChain,
    pub tag: u64,
    pub opcode: Option<Opcode>,
}

impl BatchItem {
    /// A raw chain; its tag is read from the first 16 readable bytes if they
    /// hold a request header (informational only).
    pub fn raw(chain: RawChain) -> Self {
        let mut head = Vec::new();
        for d in &chain.descs {
            if let RawDesc::Readable(b) = d {
                head.extend_from_slice(b);
                if head.len() >= REQ_HDR_SIZE {
                    break;
                }
            } else {
                break;
            }
        }
        let tag = virtio_dmabuf_protocol::RequestHeader::from_bytes(&head).map_or(0, |h| h.tag);
        BatchItem {
            chain,
            tag,
            opcode: None,
        }
    }
}

#[derive(Debug, Default)]
struct Prepared {
    descs: Vec<Desc>,
    buffers: Vec<Buffer>,
    writable: Vec<(u64, u32)>,
    table: Option<Buffer>,
    looped: bool,
}

impl Prepared {
    fn ring_slots(&self) -> usize {
        if self.table.is_some() {
            1
        } else {
            self.descs.len()
        }
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn event_record(c: RawCompletion) -> EventRecord {
    let event = if c.used_len as usize >= EVENT_SIZE {
        Event::from_bytes(&c.written)
    } else {
        None
    };
    EventRecord {
        used_len: c.used_len,
        event,
        bytes: c.written,
    }
}

/// Decodes a typed completion and checks the framing rules of section 4
/// that the driver can see: `used.len` within the writable part, the tag
/// echoed, a failure carrying the header alone (`EOVERFLOW` from `MAP` the
/// header and the fixed reply), and a success exactly as long as its reply.
pub fn check_response(
    opcode: Opcode,
    tag: u64,
    c: &RawCompletion,
) -> Result<Response, DriverError> {
    let bad = |why: String| DriverError::Nonconforming { opcode, why };
    let used = c.used_len as usize;
    if used > c.capacity {
        return Err(bad(format!(
            "used.len {used} exceeds the writable part ({} bytes)",
            c.capacity
        )));
    }
    if used < RESP_HDR_SIZE {
        return Err(bad(format!(
            "used.len {used} is shorter than the response header"
        )));
    }
    let (got, response) = decode_response(opcode, &c.written)
        .map_err(|source| DriverError::Decode { opcode, source })?;
    if got != tag {
        return Err(DriverError::TagMismatch {
            opcode,
            expected: tag,
            got,
        });
    }
    let expected = match &response {
        Err(_) => Some(RESP_HDR_SIZE),
        Ok(Reply::MapOverflow { .. }) => Some(RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE),
        Ok(Reply::Map(m)) => {
            Some(RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE + m.entries.len() * SEGMENT_SIZE)
        }
        Ok(Reply::Data(_)) => None,
        Ok(_) => Some(RESP_HDR_SIZE + opcode.fixed_reply_size()),
    };
    if let Some(expected) = expected {
        if used != expected {
            return Err(bad(format!(
                "used.len {used}, the contract says {expected} for {:?}",
                virtio_dmabuf_protocol::response_status(&response)
            )));
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_within_a_budget_keeps_its_first_cut_and_fits() {
        let split = ChainLayout {
            max_desc_len: Some(3),
            first_desc_len: Some(5),
            indirect: false,
        };
        // Fits already: unchanged.
        assert_eq!(split.within(16, 8, 64), split);
        let fitted = split.within(8192, 400, 64);
        let count = fitted.pieces(8192).len() + fitted.pieces(400).len();
        assert!(count <= 64, "{count} descriptors");
        assert_eq!(fitted.pieces(8192)[0], 5, "the header cut stays");
        assert_eq!(fitted.first_desc_len, Some(5));
        // One descriptor per part cannot be cut finer or coarser.
        let whole = ChainLayout::default();
        assert_eq!(whole.within(1 << 20, 1 << 20, 2), whole);
    }
}
