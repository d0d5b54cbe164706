// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The request queues (controlq and controlq2..): descriptor chains in,
//! typed requests to the model, responses out (sections 2 and 4).
//!
//! Each chain is decoded once ([`parse_request`]) from the bytes of its
//! readable part, read into the worker's buffer across as many descriptors
//! as the driver split it into (`chain.rs`). The data of a `TRANSFER` is
//! not: it is copied once, between the object and the chain's descriptors
//! ([`DmabufBackend::transfer_in_place`]), unless the transfer must wait
//! for fences, when its data is copied out of the chain first.
//!
//! Every chain taken from the avail ring goes back to the used ring exactly
//! once (section 4). A chain is entered in the connection's [`Chains`]
//! table in the same critical section that pops it, and whoever removes
//! it from the table returns it: the worker, a completion of a parked
//! request, a vring stop, or nobody (a device reset, a disconnect: the
//! rings are the driver's again). The worker takes chains a batch at a
//! time; it writes the response of each it answers (at once, or after the
//! front-end acted on the back-end channel messages of the request) and
//! leaves it in the table marked written, and puts the batch's written
//! chains on the used ring together, in the critical section that takes
//! the next batch (or before it waits for the front-end). Writes to a ring
//! happen only with the table locked, so:
//!
//! - `GET_VRING_BASE` (section 6) takes the table, cancels the ring's
//!   parked requests, and returns every chain of the ring still held
//!   before the front-end gets its answer: parked ones and ones not yet
//!   given to the model with `ECANCELED`, ones whose request the model
//!   already answered with that answer, written ones as they are. The
//!   worker finds them gone and writes nothing; a request of the stopped
//!   ring is never submitted after the stop.
//! - `RESET_DEVICE` empties the table: nothing of the old rings is
//!   written into the rings the driver sets up next.
//!
//! The table lock is never held while waiting for the front-end (the
//! back-end channel), so a vring stop never waits for one (section 1).
//! The table comes first in the daemon's lock order (`state.rs`,
//! `# Locking`).

use std::cell::{Cell, Ref, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_dmabuf_protocol::{
    encode_response, encode_response_into, parse_request, parse_transfer_to_host, response_status,
    Opcode, Reply, Request, RequestHeader, Response, Status, REQ_HDR_SIZE, RESP_HDR_SIZE,
    SEGMENT_SIZE,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use self::chain::{header_tag, write_response, Segments, Walk};
use super::channel::{Channel, ChannelError, MessageKind};
use super::vhost_frontend::Link;
use super::{locked, DmabufBackend, TRANSFER_MAX};
use crate::backend::guest_memory::GuestRam;
use crate::exporter::{Exporter, GuestId, InPlace, Origin};
use crate::state::lock_order::{Ordered, Rank};

/// Where a chain in flight is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Taken from the avail ring; its request is not in the model.
    Taken,
    /// Its request waits in the model; a completion returns it.
    Parked,
    /// The model answered (these bytes); the worker waits for the
    /// front-end to act on the request's back-end channel messages.
    Answered(Vec<u8>),
    /// Its response is written into its writable part (`used.len` this);
    /// it goes on the used ring with the other chains of the worker's
    /// batch ([`DmabufBackend::put_written`]).
    Written(u32),
}

/// A chain taken from a request queue and not returned yet.
#[derive(Debug, Clone)]
struct InFlight {
    queue: u16,
    head: u16,
    /// The writable descriptors, in order.
    writable: Segments,
    /// The request's tag, once its header was read.
    tag: u64,
    stage: Stage,
}

/// The chains of one connection that are off the avail ring and not yet
/// on the used ring, by token (the token is the request's [`Origin`]).
#[derive(Debug, Default)]
pub(crate) struct Chains {
    entries: Slots,
    next_token: u64,
}

/// Bits of a token that name its slot: more than the chains a connection
/// can have in flight (the table holds at most every ring full: 63 request
/// queues of 32,768 descriptors, under 2^21; `take_chains` returns the
/// rest unread).
const SLOT_BITS: u32 = 22;

/// The chains in flight, each in a slot of its own, reused once it is
/// free: a token is its chain's sequence number (high bits, never reused)
/// and its slot (low [`SLOT_BITS`] bits), so finding, entering and
/// removing a chain costs no search and no allocation past the most
/// chains ever in flight at once.
#[derive(Debug, Default)]
struct Slots {
    slots: Vec<Option<(u64, InFlight)>>,
    free: Vec<usize>,
    len: usize,
}

impl Slots {
    fn insert(&mut self, sequence: u64, chain: InFlight) -> u64 {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        assert!(
            slot < 1 << SLOT_BITS,
            "more chains in flight than a ring can hold"
        );
        let token = (sequence << SLOT_BITS) | slot as u64;
        self.slots[slot] = Some((token, chain));
        self.len += 1;
        token
    }

    fn slot(&self, token: u64) -> usize {
        (token & ((1 << SLOT_BITS) - 1)) as usize
    }

    fn get_mut(&mut self, token: &u64) -> Option<&mut InFlight> {
        let slot = self.slot(*token);
        match self.slots.get_mut(slot) {
            Some(Some((t, chain))) if t == token => Some(chain),
            _ => None,
        }
    }

    fn remove(&mut self, token: &u64) -> Option<InFlight> {
        let slot = self.slot(*token);
        let entry = self.slots.get_mut(slot)?;
        if !matches!(entry, Some((t, _)) if t == token) {
            return None;
        }
        let (_, chain) = entry.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(chain)
    }

    /// The chains in the order they were taken.
    fn tokens_where(&self, keep: impl Fn(&InFlight) -> bool) -> Vec<u64> {
        let mut tokens: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|(_, chain)| keep(chain))
            .map(|(token, _)| *token)
            .collect();
        tokens.sort_unstable();
        tokens
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.len = 0;
    }
}

impl Chains {
    fn insert(&mut self, queue: u16, head: u16, writable: Segments) -> u64 {
        self.next_token += 1;
        self.entries.insert(
            self.next_token,
            InFlight {
                queue,
                head,
                writable,
                tag: 0,
                stage: Stage::Taken,
            },
        )
    }

    /// How many chains are in flight.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many chains this connection took from its request queues.
    pub(crate) fn taken(&self) -> u64 {
        self.next_token
    }

    /// Forgets every chain (device reset, disconnect).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// What one connection's requests came to, for the summary logged when it
/// ends. Costs nothing per request unless debug logging is on (or a quota
/// refuses a request).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Requests refused by a per-guest quota (`--max-objects`, `--max-bytes`).
    quota_refusals: AtomicU64,
    /// Times a request queue was found broken ([`DmabufBackend::ring_fault`]).
    ring_faults: AtomicU64,
    /// Answers by opcode and status; counted only while debug logging is on.
    answers: Mutex<BTreeMap<(Opcode, Status), u64>>,
}

impl Tally {
    /// `n requests (...)` for the disconnect line.
    pub(crate) fn summary(&self, requests: u64) -> String {
        let mut text = format!("{requests} requests");
        let quota = self.quota_refusals.load(Ordering::Relaxed);
        if quota > 0 {
            text.push_str(&format!(", {quota} refused by a quota"));
        }
        let faults = self.ring_faults.load(Ordering::Relaxed);
        if faults > 0 {
            text.push_str(&format!(", {faults} ring faults"));
        }
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if !answers.is_empty() {
            let list: Vec<String> = answers
                .iter()
                .map(|((op, status), n)| format!("{op} {status} {n}"))
                .collect();
            text.push_str(&format!(" [{}]", list.join(", ")));
        }
        text
    }
}

/// Why a per-guest quota refused `opcode` (`ENOSPC`), in the operator's
/// terms; none when the refusal was not a quota's (section 7.1 `GET_INFO`
/// reports the quotas to the guest).
fn quota_refusal(
    ex: &Exporter,
    guest: GuestId,
    opcode: Opcode,
    asked: u64,
    response: Option<&Response>,
) -> Option<String> {
    if !matches!(response, Some(Err(Status::NoSpc))) {
        return None;
    }
    let limits = ex.config().limits;
    let g = ex.guests.get(guest)?;
    let held = g.held.len();
    let why = if held >= limits.max_objects as usize {
        format!("it holds {held} objects, the --max-objects limit")
    } else if opcode == Opcode::Create && g.bytes.saturating_add(asked) > limits.max_bytes {
        format!(
            "its objects use {} bytes and {asked} more would pass --max-bytes {}",
            g.bytes, limits.max_bytes
        )
    } else if g.fd_objects >= limits.max_fd_objects {
        format!(
            "{} of its objects have fds of their own, the --max-fd-objects limit",
            g.fd_objects
        )
    } else {
        return None;
    };
    Some(format!(
        "{opcode} refused with ENOSPC: {why}; raise the limit if the guest needs more, \
         or look for objects it never releases (ctl list)"
    ))
}

thread_local! {
    /// A worker's buffers for the readable bytes of the request it serves
    /// and for an encoded response: reused, so that serving a request
    /// allocates neither.
    static REQUEST_BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RESPONSE_BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A worker's batch of chains taken from a ring, kept between batches.
    static TAKEN: Cell<Vec<Take>> = const { Cell::new(Vec::new()) };
    /// The tokens of a batch's answered chains ([`Batch::answered`]).
    static ANSWERED: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

/// What a worker answered on a ring and has not told the driver yet.
#[derive(Debug, Default)]
struct Batch {
    /// The tokens of the chains answered whose used entries are not
    /// written yet (all go on the used ring under one ring lock).
    answered: RefCell<Vec<u64>>,
    /// Used entries were written since the ring's last signal (or its
    /// last look at whether the driver wants one).
    unsignalled: Cell<bool>,
    /// A request of the batch that went to the model saw parked requests
    /// of this guest completed (its own doing or another queue's): they
    /// are delivered after the batch, or before a `LOOKUP`, not only when
    /// the worker is done with the ring, which a busy ring may never be.
    /// (Completions no request of the batch saw still come with the
    /// guest's wake-up event.)
    completions: Cell<bool>,
}

/// What a worker's buffer keeps after a request (a `TRANSFER` may need
/// far more once).
const KEPT_CAPACITY: usize = 64 << 10;

/// Runs `f` on the encoding of `response` in the worker's buffer.
fn with_encoded<T>(tag: u64, response: &Response, f: impl FnOnce(&[u8]) -> T) -> T {
    RESPONSE_BYTES.with_borrow_mut(|bytes| {
        encode_response_into(tag, response, bytes);
        let result = f(bytes);
        if bytes.capacity() > KEPT_CAPACITY {
            *bytes = Vec::new();
        }
        result
    })
}

/// The ring a worker serves, with the guest memory it loaded for it.
struct Ring<'a> {
    queue: u16,
    vring: &'a VringRwLock,
    mem: &'a GuestRam,
    guest: GuestId,
    /// The worker's batch. None: each chain goes on the used ring when
    /// answered (the caller signals).
    batch: Option<&'a Batch>,
    /// The back-end channel as the worker last saw it, with its generation
    /// ([`Link::channel_generation`]): a request looks it up without a lock.
    channel: RefCell<(u64, Option<Arc<Channel>>)>,
    /// The time the batch's requests are submitted at: read once the
    /// batch is off the avail ring, and again after a wait for the
    /// front-end, so their deadlines count from no earlier than when the
    /// device took them (one clock read per batch, not per request;
    /// `docs/protocol.md`, "Choices where the contract is silent",
    /// Deadlines).
    now: Cell<Instant>,
}

impl Ring<'_> {
    fn new<'a>(
        queue: u16,
        vring: &'a VringRwLock,
        mem: &'a GuestRam,
        guest: GuestId,
        batch: Option<&'a Batch>,
    ) -> Ring<'a> {
        Ring {
            queue,
            vring,
            mem,
            guest,
            batch,
            channel: RefCell::new((u64::MAX, None)),
            now: Cell::new(Instant::now()),
        }
    }

    /// The connection's back-end channel, looked up again only when the
    /// front-end installed another since the last look.
    fn channel(&self, link: &Link) -> Ref<'_, Option<Arc<Channel>>> {
        if self.channel.borrow().0 != link.channel_generation() {
            *self.channel.borrow_mut() = link.channel_with_generation();
        }
        Ref::map(self.channel.borrow(), |(_, channel)| channel)
    }

    /// Writes `bytes` as the response of chain `token` and returns the
    /// chain: at once, or, in a worker's batch, marked [`Stage::Written`]
    /// and left in the table (a vring stop returns it as it is) until the
    /// batch's used entries are written. False when a vring stop or a
    /// reset took the chain.
    fn settle(&self, chains: &mut Chains, token: u64, bytes: &[u8]) -> bool {
        self.settle_before(chains, token, bytes, None)
    }

    /// [`Ring::settle`] of a response header whose reply, `data` bytes, is
    /// already in the chain's writable part after it, when `data` is some.
    fn settle_before(
        &self,
        chains: &mut Chains,
        token: u64,
        header: &[u8],
        data: Option<usize>,
    ) -> bool {
        let Some(batch) = self.batch else {
            return match chains.entries.remove(&token) {
                Some(chain) => match data {
                    Some(data) => self.put_before(&chain, header, data),
                    None => self.put(&chain, header),
                },
                None => false,
            };
        };
        let Some(entry) = chains.entries.get_mut(&token) else {
            return false;
        };
        debug_assert_eq!(entry.queue, self.queue);
        let written = write_response(self.mem, entry.writable.as_slice(), header);
        let len = match (written, data) {
            (0, _) | (_, None) => written,
            (n, Some(d)) => u32::try_from(d)
                .ok()
                .and_then(|d| n.checked_add(d))
                .unwrap_or(n),
        };
        entry.stage = Stage::Written(len);
        batch.answered.borrow_mut().push(token);
        true
    }

    /// Writes `bytes` to a chain just removed from the table and puts it on
    /// the used ring. Called with the table locked.
    fn put(&self, chain: &InFlight, bytes: &[u8]) -> bool {
        debug_assert_eq!(chain.queue, self.queue);
        let len = write_response(self.mem, chain.writable.as_slice(), bytes);
        Ring::add_used(self.vring, self.guest, chain, len)
    }

    /// [`Ring::put`] of a response header whose reply, `data` bytes, is
    /// already in the chain's writable part after it.
    fn put_before(&self, chain: &InFlight, header: &[u8], data: usize) -> bool {
        debug_assert_eq!(chain.queue, self.queue);
        let written = write_response(self.mem, chain.writable.as_slice(), header);
        let len = match written {
            0 => 0,
            n => u32::try_from(data)
                .ok()
                .and_then(|d| n.checked_add(d))
                .unwrap_or(n),
        };
        Ring::add_used(self.vring, self.guest, chain, len)
    }

    fn add_used(vring: &VringRwLock, guest: GuestId, chain: &InFlight, len: u32) -> bool {
        match vring.add_used(chain.head, len) {
            Ok(()) => true,
            Err(e) => {
                let (queue, head) = (chain.queue, chain.head);
                log::warn!("guest {guest}: queue {queue}: add_used({head}): {e}");
                false
            }
        }
    }
}

/// Chains a worker takes from a ring at a time.
const BATCH: usize = 32;

/// The state of a vring under its lock.
type VringState = vhost_user_backend::VringState<crate::backend::guest_memory::GuestRamHandle>;

/// What the worker got from a ring.
enum Take {
    /// A chain entered in the table as this token, with what one walk
    /// over it found (its writable part moved into the table).
    Chain(u64, Walk),
    /// A chain whose links do not end (a loop, or a `next` off the table):
    /// entered in the table with no writable part, so it comes back with
    /// `used.len` 0.
    Cut(u64),
}

/// What [`DmabufBackend::transfer_in_place`] did with a request.
enum InPlaceTry {
    /// Answered (or taken by a vring stop meanwhile).
    Done(Outcome),
    /// A `TRANSFER` that must wait: this request, data copied, goes to the
    /// model as any other.
    Submit(RequestHeader, Request),
    /// Not a `TRANSFER`.
    NotTransfer,
}

/// What became of one request.
enum Outcome {
    /// Write these bytes (a response) and return the chain.
    Respond(Vec<u8>),
    /// The chain is back on the used ring, or waits in the model, or was
    /// taken by a vring stop or a reset: nothing more to do here.
    Settled { returned: bool },
}

fn respond(tag: u64, response: &Response) -> Outcome {
    Outcome::Respond(encode_response(tag, response))
}

/// How many readable bytes of a request of `opcode` the worker reads into
/// its buffer: its header and payload, plus `CREATE` entries. Bytes past
/// that are never read (section 4: they are ignored), but for the data of
/// a `TRANSFER_TO_HOST`, which is copied once, from where it is.
fn readable_bound(header: Option<&RequestHeader>, max_segments: u32) -> usize {
    let Some(opcode) = header.and_then(|h| Opcode::from_u32(h.opcode)) else {
        return REQ_HDR_SIZE;
    };
    let tail = match opcode {
        Opcode::Create => (max_segments as usize).saturating_mul(SEGMENT_SIZE),
        // `TRANSFER_TO_HOST` data is copied from where it is (`in_place`).
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

impl DmabufBackend {
    /// The connection's chains in flight (see the module comment for what
    /// holding this lock guarantees).
    pub(super) fn chains(&self) -> Ordered<'_, Chains> {
        Ordered::new(
            self.chains.lock().unwrap_or_else(PoisonError::into_inner),
            Rank::Table,
        )
    }

    /// Serves one request queue: the EVENT_IDX drain loop (disable
    /// notifications, take every available chain, re-enable, repeat while
    /// more arrived), then one signal for the batch, when the driver wants
    /// it. A ring that stops meanwhile is left alone at once.
    ///
    /// Chains are taken up to [`BATCH`] at a time, and the used entries of
    /// the ones answered are written together the next time the ring is
    /// locked: one table lock and one ring lock per batch, not per chain.
    pub(super) fn serve_queue(&self, queue: u16, vring: &VringRwLock) {
        let Some(memory) = self.memory() else {
            return;
        };
        let batch = Batch {
            answered: RefCell::new(ANSWERED.take()),
            unsignalled: Cell::new(false),
            completions: Cell::new(false),
        };
        let mut taken = TAKEN.take();
        let mut first = true;
        loop {
            let mem = memory.memory();
            let ring = Ring::new(queue, vring, &mem, self.guest, Some(&batch));
            let more = self.take_chains(&ring, &mut taken, first);
            first = false;
            if !more {
                break;
            }
            // After the take: no chain of the batch was made available
            // later than its requests' submission time says.
            ring.now.set(Instant::now());
            for take in taken.drain(..) {
                match take {
                    Take::Chain(token, walked) => {
                        self.serve_chain(&ring, token, &walked);
                    }
                    Take::Cut(token) => {
                        log::debug!(
                            "guest {}: queue {queue}: a descriptor chain that does not end \
                             (a loop or a next index off its table): used.len 0",
                            self.guest
                        );
                        self.finish(&ring, token, &[]);
                    }
                }
            }
            if batch.completions.take() {
                self.deliver_completions();
            }
        }
        TAKEN.set(taken);
        ANSWERED.set(batch.answered.into_inner());
    }

    /// Puts the chains the worker answered on the used ring, and pops up
    /// to [`BATCH`] more chains, each entered in the table: one critical
    /// section of the table and the ring (a vring stop sees every chain
    /// that left the avail ring). Returns whether chains were taken (or
    /// returned unread).
    ///
    /// The EVENT_IDX drain loop runs here too: notifications are disabled
    /// on the `first` take, and when nothing is left they are enabled again
    /// (and the ring looked at once more, for chains that came meanwhile).
    /// A ring with nothing left gets the event's one signal, if a chain
    /// went back on it since the last signal and the driver wants it. A
    /// ring stopped, disabled or broken is left alone at once (enabling
    /// notifications would only spin on a ring that gives nothing: `iter`
    /// refuses a stopped queue while `enable_notification` still sees
    /// work), and so is one whose avail index says more than its entries
    /// give (entries outside guest memory) after one more look: with
    /// EVENT_IDX its driver does not kick it again, so it stays until the
    /// ring is restarted. Past every ring full of chains in flight (heads
    /// made available again before they came back), chains are returned
    /// unread (`used.len` 0): the table never holds more.
    fn take_chains(&self, ring: &Ring<'_>, taken: &mut Vec<Take>, first: bool) -> bool {
        let queue = ring.queue;
        let mem = ring.mem;
        let Some(batch) = ring.batch else {
            return false;
        };
        let mut chains = self.chains();
        let mut state = ring.vring.get_mut();
        self.put_written(ring, batch, &mut chains, &mut state);
        let mut looked_again = false;
        let open = state.is_enabled() && state.get_queue().ready();
        if open && first {
            if let Err(e) = state.get_queue_mut().disable_notification(mem) {
                log::debug!("guest {}: queue {queue}: {e}", self.guest);
            }
        }
        if open {
            loop {
                // What a driver can have in flight is every ring full.
                let room = self.max_chains().saturating_sub(chains.len());
                if room == 0 {
                    match self.return_unread(ring, &chains, &mut state) {
                        Some(0) => {}
                        Some(_) => return true,
                        None => break,
                    }
                } else {
                    let iter = match state.get_queue_mut().iter(mem) {
                        Ok(iter) => iter,
                        Err(e) => {
                            self.ring_fault(queue, &e.to_string());
                            break;
                        }
                    };
                    for chain in iter.take(BATCH.min(room)) {
                        let mut walked = chain::walk(&chain, mem);
                        if !walked.ends {
                            let token =
                                chains.insert(queue, chain.head_index(), Segments::default());
                            taken.push(Take::Cut(token));
                            continue;
                        }
                        let writable = std::mem::take(&mut walked.writable);
                        let token = chains.insert(queue, chain.head_index(), writable);
                        taken.push(Take::Chain(token, walked));
                    }
                    if !taken.is_empty() {
                        return true;
                    }
                }
                match state.get_queue_mut().enable_notification(mem) {
                    // Entries the avail index counts but that cannot be
                    // read: the ring is broken (section 4 names no status
                    // for it). With EVENT_IDX the driver does not kick it
                    // again; a restart of the ring (or a reset) is what
                    // brings it back.
                    Ok(true) if looked_again => {
                        self.ring_fault(
                            queue,
                            "the avail index is ahead of entries that cannot be read \
                             (outside guest memory): the ring is left until it is restarted",
                        );
                        break;
                    }
                    // More came meanwhile: take it with notifications off.
                    Ok(true) => {
                        looked_again = true;
                        if let Err(e) = state.get_queue_mut().disable_notification(mem) {
                            log::debug!("guest {}: queue {queue}: {e}", self.guest);
                        }
                    }
                    Ok(false) => break,
                    Err(e) => {
                        log::debug!("guest {}: queue {queue}: {e}", self.guest);
                        break;
                    }
                }
            }
        }
        if batch.unsignalled.get() {
            self.signal_locked(queue, mem, &mut state);
            batch.unsignalled.set(false);
        }
        false
    }

    /// The most chains a driver can have in flight: every ring full.
    fn max_chains(&self) -> usize {
        usize::from(self.settings.request_queues) * usize::from(self.settings.max_queue_size)
    }

    /// With more chains in flight than the rings hold (the driver made
    /// heads available again before they came back), up to [`BATCH`]
    /// chains of `ring` go back unread (`used.len` 0), so the table stays
    /// bounded; with the table and the ring held. Returns how many, or
    /// none when the avail ring cannot be read.
    #[cold]
    fn return_unread(
        &self,
        ring: &Ring<'_>,
        chains: &Chains,
        state: &mut VringState,
    ) -> Option<usize> {
        let (queue, mem) = (ring.queue, ring.mem);
        let batch = ring.batch?;
        let mut heads = [0u16; BATCH];
        let mut count = 0;
        match state.get_queue_mut().iter(mem) {
            // `heads` first: a chain is popped only when there is room for
            // its head.
            Ok(iter) => {
                for (head, chain) in heads.iter_mut().zip(iter) {
                    *head = chain.head_index();
                    count += 1;
                }
            }
            Err(e) => {
                self.ring_fault(queue, &e.to_string());
                return None;
            }
        }
        for &head in &heads[..count] {
            match state.get_queue_mut().add_used(mem, head, 0) {
                Ok(()) => batch.unsignalled.set(true),
                Err(e) => log::debug!("guest {}: queue {queue}: {e}", self.guest),
            }
        }
        if count > 0 {
            self.ring_fault(
                queue,
                &format!(
                    "{count} chains made available while {} are in flight, more than the \
                     rings hold: returned unread",
                    chains.len()
                ),
            );
        }
        Some(count)
    }

    /// Signals the ring's call eventfd if the driver wants it (EVENT_IDX),
    /// with the ring held.
    fn signal_locked(&self, queue: u16, mem: &GuestRam, state: &mut VringState) {
        match state.get_queue_mut().needs_notification(mem) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    log::debug!(
                        "guest {}: queue {queue}: signal used queue: {e}",
                        self.guest
                    );
                }
            }
            Ok(false) => {}
            Err(e) => log::debug!(
                "guest {}: queue {queue}: needs_notification: {e}",
                self.guest
            ),
        }
    }

    /// Writes the used entries of the chains in the batch (those still in
    /// the table, at [`Stage::Written`]), with the table and the ring held;
    /// marks the batch unsignalled when one went on the used ring.
    fn put_written(
        &self,
        ring: &Ring<'_>,
        batch: &Batch,
        chains: &mut Chains,
        state: &mut VringState,
    ) {
        for token in batch.answered.borrow_mut().drain(..) {
            if !matches!(chains.entries.get_mut(&token), Some(c) if matches!(c.stage, Stage::Written(_)))
            {
                continue;
            }
            let Some(chain) = chains.entries.remove(&token) else {
                continue;
            };
            let Stage::Written(len) = chain.stage else {
                continue;
            };
            match state.get_queue_mut().add_used(ring.mem, chain.head, len) {
                Ok(()) => batch.unsignalled.set(true),
                Err(e) => log::warn!(
                    "guest {}: queue {}: add_used({}): {e}",
                    self.guest,
                    chain.queue,
                    chain.head
                ),
            }
        }
    }

    /// Puts the chains answered so far in `ring`'s batch on the used ring
    /// and signals the driver for every chain that went back since the
    /// last signal, before the worker waits for the front-end; with
    /// `deliver`, also delivers the completions the batch saw. Not before
    /// the wait for a request's own back-end channel messages: a request
    /// its `submit` completed (a lock granted after an eviction moved the
    /// object in the window) must not be answered before the front-end
    /// acted on them; they go after the batch.
    fn flush_batch(&self, ring: &Ring<'_>, deliver: bool) {
        let Some(batch) = ring.batch else {
            return;
        };
        if !batch.answered.borrow().is_empty() || batch.unsignalled.get() {
            let mut chains = self.chains();
            let mut state = ring.vring.get_mut();
            self.put_written(ring, batch, &mut chains, &mut state);
            if batch.unsignalled.get() {
                self.signal_locked(ring.queue, ring.mem, &mut state);
                batch.unsignalled.set(false);
            }
        }
        if deliver && batch.completions.take() {
            self.deliver_completions();
        }
    }

    fn serve_chain(&self, ring: &Ring<'_>, token: u64, walked: &Walk) -> bool {
        let mem = ring.mem;
        let room = walked.room;
        let outcome = if room < RESP_HDR_SIZE {
            // No place for a response: used.len = 0 (section 4).
            Outcome::Respond(Vec::new())
        } else {
            REQUEST_BYTES.with_borrow_mut(|bytes| {
                let max_segments = self.settings.max_segments;
                let outcome = match chain::read_walked(walked, mem, max_segments, bytes) {
                    Ok(()) => self.run_request(ring, token, bytes, walked, room),
                    // A readable part outside guest memory (section 4), with
                    // the tag echoed when the header itself could be read.
                    Err(status) => respond(header_tag(walked, mem).unwrap_or(0), &Err(status)),
                };
                if bytes.capacity() > KEPT_CAPACITY {
                    *bytes = Vec::new();
                }
                outcome
            })
        };
        match outcome {
            Outcome::Respond(bytes) => self.finish(ring, token, &bytes),
            Outcome::Settled { returned } => returned,
        }
    }

    fn run_request(
        &self,
        ring: &Ring<'_>,
        token: u64,
        readable: &[u8],
        walked: &Walk,
        room: usize,
    ) -> Outcome {
        let queue = ring.queue;
        let parsed = match self.transfer_in_place(ring, token, readable, walked, room) {
            InPlaceTry::Done(outcome) => return outcome,
            InPlaceTry::Submit(header, request) => Ok((header, request)),
            InPlaceTry::NotTransfer => parse_request(readable, room),
        };
        let (header, request) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                log::debug!("guest {}: queue {queue}: {e}", self.guest);
                return respond(e.tag.unwrap_or(0), &Err(e.status));
            }
        };
        let tag = header.tag;
        let opcode = request.opcode();
        if let Err(status) = check_limits(&request) {
            self.answered(queue, tag, opcode, &Err(status), "");
            return respond(tag, &Err(status));
        }
        let asked = match &request {
            Request::Create { size, .. } => *size,
            _ => 0,
        };
        let map_shm_handle = match &request {
            Request::MapShm { object, .. } => Some(*object),
            _ => None,
        };
        let looked_up = self.look_up_for_open(ring, token, tag, &request);
        if looked_up.is_some() {
            ring.now.set(Instant::now());
        }

        let channel = ring.channel(&self.link);
        let mut chains = self.chains();
        let Some(entry) = chains.entries.get_mut(&token) else {
            // A vring stop or a device reset took the chain (while the
            // LOOKUP ran): its request never reaches the model.
            drop(chains);
            if let Some(uuid) = looked_up {
                self.link.clear_lookup(&uuid);
            }
            return Outcome::Settled { returned: false };
        };
        entry.tag = tag;
        let (response, posted) = {
            let mut ex = self.state.lock();
            let now = ring.now.get();
            let before = channel.as_ref().map_or(0, |c| c.posted());
            let response = ex.submit(self.guest, Origin { queue, token }, tag, request, now);
            let after = channel.as_ref().map_or(0, |c| c.posted());
            if let Some(why) = quota_refusal(&ex, self.guest, opcode, asked, response.as_ref()) {
                self.quota_refused(queue, &why);
            }
            if let Some(batch) = ring.batch {
                if ex.has_completions(self.guest) {
                    batch.completions.set(true);
                }
            }
            self.state.changed(&ex);
            (response, (before, after))
        };
        if let Some(uuid) = looked_up {
            self.link.clear_lookup(&uuid);
        }
        let Some(response) = response else {
            // Parked: a completion (or a vring stop) returns the chain.
            if let Some(chain) = chains.entries.get_mut(&token) {
                chain.stage = Stage::Parked;
            }
            log::debug!(
                "guest {}: queue {queue}: {opcode} tag {tag}: parked",
                self.guest
            );
            return Outcome::Settled { returned: false };
        };
        let channel = match posted.1 > posted.0 {
            true => channel.clone(),
            false => None,
        };
        let Some(channel) = channel else {
            self.answered(queue, tag, opcode, &response, "");
            let returned = with_encoded(tag, &response, |bytes| {
                ring.settle(&mut chains, token, bytes)
            });
            return Outcome::Settled { returned };
        };
        // What the model asked of the front-end must be done before the
        // guest hears the answer (a MAP_SHM'd window must be mapped). The
        // table is not held meanwhile: a vring stop returns the chain with
        // the model's answer without waiting for the front-end (section 1).
        if let Some(chain) = chains.entries.get_mut(&token) {
            chain.stage = Stage::Answered(encode_response(tag, &response));
        }
        drop(chains);
        // The chains answered before this one are not kept waiting; what
        // this request completed waits for its messages (after the batch).
        self.flush_batch(ring, false);
        let waited = channel.wait(posted.1, self.settings.channel_wait);
        ring.now.set(Instant::now());
        if !waited {
            log::warn!(
                "guest {}: front-end did not answer the back-end channel within {:?}",
                self.guest,
                self.settings.channel_wait
            );
        }
        let mut response = response;
        for (kind, why) in channel.take_failures(posted.0, posted.1) {
            response = self.front_end_refused(opcode, map_shm_handle, kind, &why, response);
        }
        self.answered(
            queue,
            tag,
            opcode,
            &response,
            " (after the back-end channel)",
        );
        respond(tag, &response)
    }

    /// A `TRANSFER_TO_HOST` or `TRANSFER_FROM_HOST` served with one copy
    /// between the object and the chain's own descriptors (no request or
    /// response buffer holds the data) when it can run now. One that must
    /// wait for fences goes to the model as any request, its data copied
    /// out of the chain first, since the chain's memory may change under a
    /// parked request.
    fn transfer_in_place(
        &self,
        ring: &Ring<'_>,
        token: u64,
        readable: &[u8],
        walked: &Walk,
        room: usize,
    ) -> InPlaceTry {
        let queue = ring.queue;
        let opcode = RequestHeader::from_bytes(readable).and_then(|h| Opcode::from_u32(h.opcode));
        let fixed = REQ_HDR_SIZE + Opcode::TransferToHost.payload_size();
        let parsed = match opcode {
            Some(Opcode::TransferToHost) => {
                let available = walked.readable_len().saturating_sub(fixed);
                parse_transfer_to_host(readable, available, room).map(|(header, t)| {
                    let t = InPlace {
                        to_host: true,
                        object: t.object,
                        offset: t.offset,
                        len: t.len,
                    };
                    (header, t)
                })
            }
            Some(Opcode::TransferFromHost) => match parse_request(readable, room) {
                Ok((
                    header,
                    Request::TransferFromHost {
                        object,
                        offset,
                        len,
                    },
                )) => {
                    let t = InPlace {
                        to_host: false,
                        object,
                        offset,
                        len,
                    };
                    Ok((header, t))
                }
                Ok((header, request)) => return InPlaceTry::Submit(header, request),
                Err(e) => Err(e),
            },
            _ => return InPlaceTry::NotTransfer,
        };
        let (header, t) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                log::debug!("guest {}: queue {queue}: {e}", self.guest);
                return InPlaceTry::Done(respond(e.tag.unwrap_or(0), &Err(e.status)));
            }
        };
        let (tag, opcode) = match t.to_host {
            true => (header.tag, Opcode::TransferToHost),
            false => (header.tag, Opcode::TransferFromHost),
        };
        let Ok(len) = usize::try_from(t.len).map_err(|_| ()).and_then(|len| {
            if t.len > TRANSFER_MAX {
                Err(())
            } else {
                Ok(len)
            }
        }) else {
            self.answered(queue, tag, opcode, &Err(Status::Inval), "");
            return InPlaceTry::Done(respond(tag, &Err(Status::Inval)));
        };
        if let Some(outcome) = self.copy_in_place(ring, token, tag, t, walked) {
            return InPlaceTry::Done(outcome);
        }
        let request = if t.to_host {
            let mut data = Vec::new();
            if let Err(status) = chain::read_range(walked, ring.mem, fixed, len, &mut data) {
                return InPlaceTry::Done(respond(tag, &Err(status)));
            }
            Request::TransferToHost {
                object: t.object,
                offset: t.offset,
                data,
            }
        } else {
            Request::TransferFromHost {
                object: t.object,
                offset: t.offset,
                len: t.len,
            }
        };
        InPlaceTry::Submit(header, request)
    }

    /// The copy of [`Self::transfer_in_place`] and the chain's return, with
    /// the table and then the model held; `None` when the request must
    /// wait for fences (nothing was copied).
    fn copy_in_place(
        &self,
        ring: &Ring<'_>,
        token: u64,
        tag: u64,
        t: InPlace,
        walked: &Walk,
    ) -> Option<Outcome> {
        let mut chains = self.chains();
        let Some(entry) = chains.entries.get_mut(&token) else {
            // A vring stop or a device reset took the chain.
            return Some(Outcome::Settled { returned: false });
        };
        entry.tag = tag;
        let len = t.len as usize;
        let mut slices = Vec::new();
        let placed = match t.to_host {
            true => {
                let fixed = REQ_HDR_SIZE + Opcode::TransferToHost.payload_size();
                chain::slices(
                    ring.mem,
                    walked.readable.as_slice(),
                    fixed,
                    len,
                    &mut slices,
                )
            }
            false => chain::slices(
                ring.mem,
                entry.writable.as_slice(),
                RESP_HDR_SIZE,
                len,
                &mut slices,
            ),
        };
        let response = match placed {
            Ok(()) => {
                let mut ex = self.state.lock();
                let response = ex.transfer_in_place(self.guest, t, &slices)?;
                self.state.changed(&ex);
                response
            }
            Err(status) => Err(status),
        };
        drop(slices);
        let opcode = match t.to_host {
            true => Opcode::TransferToHost,
            false => Opcode::TransferFromHost,
        };
        self.answered(ring.queue, tag, opcode, &response, " (in place)");
        let data = match (&response, t.to_host) {
            (Ok(_), false) => len,
            _ => 0,
        };
        let returned = with_encoded(tag, &response, |bytes| {
            ring.settle_before(&mut chains, token, bytes, Some(data))
        });
        Some(Outcome::Settled { returned })
    }

    /// Debug logging of one answer, and its count for the summary; nothing
    /// at all unless debug logging is on.
    fn answered(&self, queue: u16, tag: u64, opcode: Opcode, response: &Response, how: &str) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let status = response_status(response);
        log::debug!(
            "guest {}: queue {queue}: {opcode} tag {tag}: {status}{how}",
            self.guest
        );
        *locked(&self.tally.answers)
            .entry((opcode, status))
            .or_insert(0) += 1;
    }

    /// A quota refused a request (counted for the disconnect summary).
    fn quota_refused(&self, queue: u16, why: &str) {
        self.warn_once(&self.tally.quota_refusals, queue, why);
    }

    /// A request queue the driver broke: an avail ring that cannot be
    /// read, heads made available again while in flight (counted for the
    /// disconnect summary).
    fn ring_fault(&self, queue: u16, why: &str) {
        self.warn_once(&self.tally.ring_faults, queue, why);
    }

    /// Says `why` at warn level the first time `count` goes up on this
    /// connection, then at debug level: a guest that loops on it (or kicks
    /// as often as it likes) would flood the log.
    fn warn_once(&self, count: &AtomicU64, queue: u16, why: &str) {
        if count.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!("guest {}: queue {queue}: {why}", self.guest);
        } else {
            log::debug!("guest {}: queue {queue}: {why}", self.guest);
        }
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
    fn look_up_for_open(
        &self,
        ring: &Ring<'_>,
        token: u64,
        tag: u64,
        request: &Request,
    ) -> Option<[u8; 16]> {
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
        // A vring stop while the LOOKUP runs answers with the tag.
        if let Some(chain) = self.chains().entries.get_mut(&token) {
            chain.tag = tag;
        }
        // The chains answered before this one, and the requests the batch
        // completed (every back-end channel message of the batch's earlier
        // requests was waited for), are not kept waiting.
        self.flush_batch(ring, true);
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

    /// Returns chain `token` with `bytes` as its response (none: `used.len`
    /// 0), unless a vring stop or a reset took it already. True when this
    /// call returned it.
    fn finish(&self, ring: &Ring<'_>, token: u64, bytes: &[u8]) -> bool {
        ring.settle(&mut self.chains(), token, bytes)
    }

    /// Writes `bytes` to a chain just removed from the table and puts it on
    /// the used ring. Called with the table locked.
    fn return_chain(&self, chain: &InFlight, bytes: &[u8]) -> bool {
        let vring = self.vring(chain.queue);
        let Some(vring) = vring else {
            log::warn!(
                "guest {}: queue {}: no ring to return chain {} to",
                self.guest,
                chain.queue,
                chain.head
            );
            return false;
        };
        match self.memory() {
            Some(memory) => {
                Ring::new(chain.queue, &vring, &memory.memory(), self.guest, None).put(chain, bytes)
            }
            None => Ring::add_used(&vring, self.guest, chain, 0),
        }
    }

    /// Signals each of `queues` once, if the driver wants it. Called with
    /// the table locked.
    fn signal_queues(&self, queues: &BTreeSet<u16>) {
        if queues.is_empty() {
            return;
        }
        for q in queues {
            if let Some(vring) = self.vring(*q) {
                self.signal(&vring);
            }
        }
    }

    /// Writes the completions of this guest's parked requests to their
    /// chains and returns them, then signals each queue once.
    pub(super) fn deliver_completions(&self) {
        let mut chains = self.chains();
        self.deliver_completions_locked(&mut chains);
    }

    fn deliver_completions_locked(&self, chains: &mut Chains) {
        let completions = self.state.lock().take_completions_for(self.guest);
        let mut touched = BTreeSet::new();
        for c in completions {
            let Some(chain) = chains.entries.remove(&c.origin.token) else {
                log::debug!(
                    "guest {}: completion of {} for a chain no longer held",
                    self.guest,
                    c.opcode
                );
                continue;
            };
            self.answered(chain.queue, c.tag, c.opcode, &c.response, " (was parked)");
            if self.return_chain(&chain, &encode_response(c.tag, &c.response)) {
                touched.insert(chain.queue);
            }
        }
        self.signal_queues(&touched);
    }

    /// A vring stop (`GET_VRING_BASE`, section 6): every chain of `queue`
    /// that left the avail ring is back on the used ring when this returns.
    /// Parked requests and requests not yet given to the model end with
    /// `ECANCELED`; a request the model answered while the worker waits
    /// for the front-end gets that answer. The guest's state stays.
    pub(super) fn stop_ring(&self, queue: u16) {
        let mut chains = self.chains();
        {
            let mut ex = self.state.lock();
            ex.cancel_queue(self.guest, queue, Instant::now());
            self.state.changed(&ex);
        }
        self.deliver_completions_locked(&mut chains);
        let left = chains.entries.tokens_where(|c| c.queue == queue);
        let mut touched = BTreeSet::new();
        for token in left {
            let Some(chain) = chains.entries.remove(&token) else {
                continue;
            };
            let bytes = match &chain.stage {
                Stage::Answered(bytes) => bytes.clone(),
                Stage::Written(len) => {
                    if let Some(vring) = self.vring(queue) {
                        if Ring::add_used(&vring, self.guest, &chain, *len) {
                            touched.insert(queue);
                        }
                    }
                    continue;
                }
                Stage::Taken | Stage::Parked => {
                    log::debug!(
                        "guest {}: queue {queue}: tag {}: ECANCELED by the vring stop",
                        self.guest,
                        chain.tag
                    );
                    encode_response(chain.tag, &Err(Status::Canceled))
                }
            };
            if self.return_chain(&chain, &bytes) {
                touched.insert(queue);
            }
        }
        self.signal_queues(&touched);
    }

    /// A device reset (`RESET_DEVICE`, section 6): everything the guest held
    /// is released and the chains in flight are forgotten, never written:
    /// the rings are the driver's again, and the ones it sets up next get
    /// nothing that belongs to an old request.
    pub(super) fn reset_rings(&self, caps: crate::exporter::GuestCaps) {
        let mut chains = self.chains();
        {
            let mut ex = self.state.lock();
            ex.disconnect(self.guest, Instant::now());
            ex.take_completions_for(self.guest);
            ex.connect(self.guest, caps, self.frontend());
            self.state.changed(&ex);
        }
        let dropped = chains.len();
        chains.clear();
        if dropped > 0 {
            log::debug!(
                "guest {}: {dropped} chains dropped by the reset",
                self.guest
            );
        }
    }
}

mod chain;
#[cfg(test)]
mod tests;
