// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user back-end request channel (`SET_BACKEND_REQ_FD`): the
//! messages this back-end sends to its front-end, `SHMEM_MAP`/`SHMEM_UNMAP`
//! (section 7.5) and `SHARED_OBJECT_ADD`/`_REMOVE`/`_LOOKUP` (section 7.2).
//!
//! The model calls the [`crate::exporter::Frontend`] hooks with its lock
//! held, from whatever thread changed it. None of them may wait for the
//! front-end: a front-end busy in a synchronous request to us (say
//! `GET_VRING_BASE`, or `GET_SHARED_OBJECT` while it resolves our own
//! `LOOKUP`) would never answer, and the back-end's own message handling
//! would stop behind the lock (section 1). So the hooks only [`Channel::post`]
//! a message; one thread per connection sends them in order and reads each
//! reply. A vring worker that must not answer its guest before the
//! front-end has acted (a `MAP_SHM` must be mapped before the guest touches
//! the window) waits for the channel with [`Channel::wait`], holding no lock.
//!
//! The messages are written here rather than through `vhost::Backend`
//! because `Backend::shared_object_lookup` cannot receive the fd of a
//! `LOOKUP` reply (see `docs/shared-objects.md` and [`super::relay`]).

use std::collections::{BTreeMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost::vhost_user::message::{
    BackendReq, VhostUserMMap, VhostUserMMapFlags, VhostUserSharedMsg,
};
use vm_memory::ByteValued;

/// Shared memory region id of the window (section 1: one region, id 0).
pub const SHM_REGION: u8 = 0;

/// How long the channel thread waits for one reply before it gives the
/// channel up (the byte stream would be out of step after a late reply).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// vhost-user header flags.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_SIZE: usize = 12;

/// Failures of recent messages kept for [`Channel::take_failures`].
const FAILURES_KEPT: usize = 4096;

/// What the back-end asks of the front-end.
#[derive(Debug)]
pub enum Message {
    ShmemMap {
        shm_offset: u64,
        len: u64,
        writable: bool,
        fd: OwnedFd,
    },
    ShmemUnmap {
        shm_offset: u64,
        len: u64,
    },
    SharedObjectAdd([u8; 16]),
    SharedObjectRemove([u8; 16]),
    SharedObjectLookup([u8; 16]),
}

/// The kind of a message, for failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    ShmemMap,
    ShmemUnmap,
    SharedObjectAdd,
    SharedObjectRemove,
    SharedObjectLookup,
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::ShmemMap { .. } => MessageKind::ShmemMap,
            Message::ShmemUnmap { .. } => MessageKind::ShmemUnmap,
            Message::SharedObjectAdd(_) => MessageKind::SharedObjectAdd,
            Message::SharedObjectRemove(_) => MessageKind::SharedObjectRemove,
            Message::SharedObjectLookup(_) => MessageKind::SharedObjectLookup,
        }
    }

    fn request(&self) -> BackendReq {
        match self {
            Message::ShmemMap { .. } => BackendReq::SHMEM_MAP,
            Message::ShmemUnmap { .. } => BackendReq::SHMEM_UNMAP,
            Message::SharedObjectAdd(_) => BackendReq::SHARED_OBJECT_ADD,
            Message::SharedObjectRemove(_) => BackendReq::SHARED_OBJECT_REMOVE,
            Message::SharedObjectLookup(_) => BackendReq::SHARED_OBJECT_LOOKUP,
        }
    }

    /// The payload, laid out by the vhost crate's message structs.
    fn body(&self) -> Vec<u8> {
        match self {
            Message::ShmemMap {
                shm_offset,
                len,
                writable,
                ..
            } => {
                let flags = if *writable {
                    VhostUserMMapFlags::WRITABLE
                } else {
                    VhostUserMMapFlags::default()
                };
                VhostUserMMap {
                    shmid: SHM_REGION,
                    padding: [0; 7],
                    fd_offset: 0,
                    shm_offset: *shm_offset,
                    len: *len,
                    flags: flags.bits(),
                }
                .as_slice()
                .to_vec()
            }
            Message::ShmemUnmap { shm_offset, len } => VhostUserMMap {
                shmid: SHM_REGION,
                shm_offset: *shm_offset,
                len: *len,
                ..VhostUserMMap::default()
            }
            .as_slice()
            .to_vec(),
            Message::SharedObjectAdd(uuid)
            | Message::SharedObjectRemove(uuid)
            | Message::SharedObjectLookup(uuid) => VhostUserSharedMsg {
                uuid: uuid::Uuid::from_bytes(*uuid),
            }
            .as_slice()
            .to_vec(),
        }
    }
}

/// Why a message did not get the front-end's success.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the back-end channel is closed")]
    Closed,
    #[error("sending {kind:?} failed: {source}")]
    Send {
        kind: MessageKind,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the reply to {kind:?} failed: {source}")]
    Receive {
        kind: MessageKind,
        #[source]
        source: std::io::Error,
    },
    #[error("the reply to {kind:?} is malformed: {what}")]
    BadReply {
        kind: MessageKind,
        what: &'static str,
    },
    #[error("the front-end refused {kind:?} (result {result})")]
    Refused { kind: MessageKind, result: u64 },
    #[error("the front-end answered LOOKUP with success but no fd")]
    NoFd,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<(u64, Message)>,
    /// Sequence number of the last posted message.
    posted: u64,
    /// Every message up to this one has been handled.
    done: u64,
    failures: BTreeMap<u64, (MessageKind, String)>,
    /// Answers to `LOOKUP`s, by sequence number.
    lookups: BTreeMap<u64, Result<OwnedFd, ChannelError>>,
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    sock: UnixStream,
    reply_ack: bool,
    state: Mutex<State>,
    changed: Condvar,
    /// `State::posted`, readable without the lock (the worker reads it
    /// around every request it submits).
    posted: AtomicU64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's back-end channel and the thread that talks on it.
#[derive(Debug)]
pub struct Channel {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Channel {
    /// Starts the channel over `sock` (the front-end's end of the channel
    /// socket pair). `reply_ack`: ask for and read an ack of every message.
    pub fn start(sock: OwnedFd, reply_ack: bool, name: &str) -> std::io::Result<Arc<Channel>> {
        let sock = UnixStream::from(sock);
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let inner = Arc::new(Inner {
            sock,
            reply_ack,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            posted: AtomicU64::new(0),
        });
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&worker))?;
        Ok(Arc::new(Channel {
            inner,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Queues a message; never blocks. Returns its sequence number.
    pub fn post(&self, message: Message) -> Result<u64, ChannelError> {
        let mut st = self.inner.state();
        if st.closed {
            return Err(ChannelError::Closed);
        }
        st.posted += 1;
        let seq = st.posted;
        self.inner.posted.store(seq, Ordering::Release);
        st.queue.push_back((seq, message));
        self.inner.changed.notify_all();
        Ok(seq)
    }

    /// Sequence number of the last posted message.
    pub fn posted(&self) -> u64 {
        self.inner.posted.load(Ordering::Acquire)
    }

    /// Waits until every message up to `seq` was handled (or the channel
    /// closed); false on timeout.
    pub fn wait(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state();
        while st.done < seq && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Takes the failures of messages `after + 1 ..= upto`.
    pub fn take_failures(&self, after: u64, upto: u64) -> Vec<(MessageKind, String)> {
        let mut st = self.inner.state();
        let seqs: Vec<u64> = st
            .failures
            .range(after.saturating_add(1)..=upto)
            .map(|(s, _)| *s)
            .collect();
        seqs.iter().filter_map(|s| st.failures.remove(s)).collect()
    }

    /// `SHARED_OBJECT_LOOKUP`: the fd the front-end holds for `uuid`. Blocks
    /// up to `timeout`; call it with no lock held.
    pub fn lookup(&self, uuid: [u8; 16], timeout: Duration) -> Result<OwnedFd, ChannelError> {
        let seq = self.post(Message::SharedObjectLookup(uuid))?;
        if !self.wait(seq, timeout) {
            return Err(ChannelError::Timeout(timeout));
        }
        let answer = self.inner.state().lookups.remove(&seq);
        answer.unwrap_or(Err(ChannelError::Closed))
    }

    /// True once the channel stopped (closed, or the socket failed).
    pub fn is_closed(&self) -> bool {
        self.inner.state().closed
    }

    /// Stops the channel: pending messages fail, waiters wake, the thread
    /// ends (it is joined here).
    pub fn close(&self) {
        {
            let mut st = self.inner.state();
            st.closed = true;
            self.inner.changed.notify_all();
        }
        let _ = self.inner.sock.shutdown(Shutdown::Both);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.close();
    }
}

/// The channel thread: send each message, read its reply, record the outcome.
fn run(inner: &Inner) {
    loop {
        let (seq, message) = {
            let mut st = inner.state();
            loop {
                if let Some(next) = st.queue.pop_front() {
                    break next;
                }
                if st.closed {
                    return;
                }
                st = inner
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let kind = message.kind();
        let closed = inner.state().closed;
        let outcome = if closed {
            Err(ChannelError::Closed)
        } else {
            exchange(inner, &message)
        };
        log::debug!(
            "back-end channel: {:?} {message:?}: {}",
            message.request(),
            match &outcome {
                Ok(_) => "done".to_owned(),
                Err(e) => e.to_string(),
            }
        );
        let mut st = inner.state();
        match outcome {
            Ok(fd) => {
                if kind == MessageKind::SharedObjectLookup {
                    st.lookups.insert(seq, fd.ok_or(ChannelError::NoFd));
                }
            }
            Err(e) => {
                match (&e, kind) {
                    (ChannelError::Closed, _) => {}
                    // The front-end does not know the UUID: a normal answer.
                    (ChannelError::Refused { .. }, MessageKind::SharedObjectLookup) => {
                        log::debug!("back-end channel: {e}")
                    }
                    _ => log::warn!("back-end channel: {e}"),
                }
                // A broken stream cannot be trusted for the next reply.
                let fatal = matches!(
                    e,
                    ChannelError::Send { .. }
                        | ChannelError::Receive { .. }
                        | ChannelError::BadReply { .. }
                );
                if kind == MessageKind::SharedObjectLookup {
                    st.lookups.insert(seq, Err(e));
                } else {
                    st.failures.insert(seq, (kind, e.to_string()));
                }
                while st.failures.len() > FAILURES_KEPT {
                    st.failures.pop_first();
                }
                if fatal {
                    st.closed = true;
                    let _ = inner.sock.shutdown(Shutdown::Both);
                }
            }
        }
        while st.lookups.len() > FAILURES_KEPT {
            st.lookups.pop_first();
        }
        st.done = seq;
        inner.changed.notify_all();
    }
}

/// Sends one message and reads its reply when there is one. `Ok(Some(fd))`
/// only for a successful `LOOKUP`.
fn exchange(inner: &Inner, message: &Message) -> Result<Option<OwnedFd>, ChannelError> {
    let kind = message.kind();
    let lookup = kind == MessageKind::SharedObjectLookup;
    // LOOKUP always has a reply (its fd); the others only with REPLY_ACK.
    let wants_reply = lookup || inner.reply_ack;
    let flags = if inner.reply_ack && !lookup {
        VERSION_1 | FLAG_NEED_REPLY
    } else {
        VERSION_1
    };
    let body = message.body();
    let mut header = [0u8; HEADER_SIZE];
    header[0..4].copy_from_slice(&u32::from(message.request()).to_ne_bytes());
    header[4..8].copy_from_slice(&flags.to_ne_bytes());
    header[8..12].copy_from_slice(&(body.len() as u32).to_ne_bytes());
    let fd = match message {
        Message::ShmemMap { fd, .. } => Some(fd.as_fd()),
        _ => None,
    };
    send(&inner.sock, &header, &body, fd).map_err(|source| ChannelError::Send { kind, source })?;
    if !wants_reply {
        return Ok(None);
    }
    let (reply, fds) =
        receive_reply(&inner.sock).map_err(|source| ChannelError::Receive { kind, source })?;
    let field = |at: usize| -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&reply[at..at + 4]);
        u32::from_ne_bytes(b)
    };
    let bad = |what| ChannelError::BadReply { kind, what };
    if field(0) != u32::from(message.request()) {
        return Err(bad("it answers another request"));
    }
    if field(4) & FLAG_REPLY == 0 {
        return Err(bad("the REPLY flag is missing"));
    }
    if field(8) != 8 {
        return Err(bad("its payload is not one u64"));
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[HEADER_SIZE..]);
    let result = u64::from_ne_bytes(value);
    let mut fds = fds.into_iter();
    if result != 0 {
        return Err(ChannelError::Refused { kind, result });
    }
    if lookup {
        // Extra fds (a confused front-end) are closed when `fds` drops.
        return fds.next().map(Some).ok_or(ChannelError::NoFd);
    }
    Ok(None)
}

fn send(
    sock: &UnixStream,
    header: &[u8],
    body: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let fds: Vec<_> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    let total = header.len() + body.len();
    let iov = [IoSlice::new(header), IoSlice::new(body)];
    let mut sent = sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)?;
    // The fd went with the first byte; the rest (rare) goes plainly.
    while sent < total {
        let rest: Vec<u8> = header.iter().chain(body).skip(sent).copied().collect();
        let n = sendmsg(
            sock,
            &[IoSlice::new(&rest)],
            &mut SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        )?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Reads one 20-byte reply (header and u64) and the fds that came with it.
fn receive_reply(sock: &UnixStream) -> std::io::Result<([u8; HEADER_SIZE + 8], Vec<OwnedFd>)> {
    let mut reply = [0u8; HEADER_SIZE + 8];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < reply.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut reply[got..])];
        let msg = recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += msg.bytes;
    }
    Ok((reply, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Reads one message on the front-end side: header fields and body.
    fn read_message(sock: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; HEADER_SIZE];
        sock.read_exact(&mut header).expect("header");
        let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("4"));
        let mut body = vec![0u8; word(8) as usize];
        sock.read_exact(&mut body).expect("body");
        (word(0), word(4), body)
    }

    fn reply(sock: &mut UnixStream, request: u32, value: u64) {
        let mut out = Vec::new();
        out.extend_from_slice(&request.to_ne_bytes());
        out.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_ne_bytes());
        out.extend_from_slice(&8u32.to_ne_bytes());
        out.extend_from_slice(&value.to_ne_bytes());
        sock.write_all(&out).expect("reply");
    }

    #[test]
    fn messages_go_out_in_order_and_failures_are_reported() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let ch = Channel::start(OwnedFd::from(ours), true, "test-channel").expect("start");
        let a = ch
            .post(Message::SharedObjectAdd([1; 16]))
            .expect("post add");
        let b = ch
            .post(Message::ShmemUnmap {
                shm_offset: 4096,
                len: 8192,
            })
            .expect("post unmap");
        let (req, flags, body) = read_message(&mut theirs);
        assert_eq!(req, 6);
        assert_eq!(flags, VERSION_1 | FLAG_NEED_REPLY);
        assert_eq!(body, [1u8; 16]);
        reply(&mut theirs, req, 0);
        let (req, _, body) = read_message(&mut theirs);
        assert_eq!(req, 10);
        assert_eq!(body.len(), 40);
        assert_eq!(
            u64::from_ne_bytes(body[16..24].try_into().expect("8")),
            4096
        );
        reply(&mut theirs, req, 1);
        assert!(ch.wait(b, Duration::from_secs(5)));
        let failures = ch.take_failures(0, b);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, MessageKind::ShmemUnmap);
        assert!(ch.take_failures(0, a).is_empty());
        ch.close();
        assert!(ch.post(Message::SharedObjectRemove([1; 16])).is_err());
    }

    #[test]
    fn without_reply_ack_nothing_is_awaited() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let ch = Channel::start(OwnedFd::from(ours), false, "test-channel").expect("start");
        let seq = ch.post(Message::SharedObjectRemove([2; 16])).expect("post");
        assert!(ch.wait(seq, Duration::from_secs(5)));
        let (req, flags, _) = read_message(&mut theirs);
        assert_eq!((req, flags), (7, VERSION_1));
        assert!(ch.take_failures(0, seq).is_empty());
    }

    #[test]
    fn a_reply_for_another_request_breaks_the_channel() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let ch = Channel::start(OwnedFd::from(ours), true, "test-channel").expect("start");
        let seq = ch.post(Message::SharedObjectAdd([3; 16])).expect("post");
        let _ = read_message(&mut theirs);
        reply(&mut theirs, 9, 0);
        assert!(ch.wait(seq, Duration::from_secs(5)));
        assert_eq!(ch.take_failures(0, seq).len(), 1);
        assert!(ch.is_closed());
    }
}
