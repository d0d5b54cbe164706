// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control socket's event loop (contract section 11).
//!
//! One thread runs an `event_manager::EventManager` with three kinds of
//! subscriber: the listening socket, one per client connection, and the
//! wake-ups (the device's `control_wake` eventfd and our stop eventfd).
//! Nothing here blocks on the model: an eviction that must wait for the
//! reservation lock is parked in the exporter, its client stops reading
//! requests, and the answer goes out when `take_host_completions` yields
//! it after a `control_wake`.
//!
//! Subscribers cannot reach each other, so what crosses between them
//! (accepted sockets, closed clients, finished evictions) goes through
//! [`Shared`], and the loop acts on it after each `run`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use rustix::io::Errno;
use rustix::net::{
    recvmsg, send, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags,
};
use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod commands;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;

use super::wire::{self, MAX_CLIENTS, MAX_LINE};
use crate::exporter::{HostError, HostOpId};
use crate::state::DeviceState;

/// Bytes read from a client per event.
const READ_CHUNK: usize = 16 * 1024;
/// Fds accepted with one read; more are closed by the kernel (`MSG_CTRUNC`).
const FDS_PER_READ: usize = 4;
/// Received fds a client may have queued for lines not yet handled.
const MAX_QUEUED_FDS: usize = 16;
/// Connections accepted per listener event (the rest wait for the next).
const ACCEPTS_PER_EVENT: usize = 16;
/// While `accept` fails for lack of fds, how often the listener is retried.
const ACCEPT_RETRY_MS: i32 = 200;

/// The running control plane. [`ControlHandle::stop`] (or dropping it)
/// stops the thread and removes the socket file.
#[derive(Debug)]
pub struct ControlHandle {
    path: PathBuf,
    /// The socket's inode, so a file someone else put at `path` is left alone.
    inode: (u64, u64),
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ControlHandle {
    /// Where the socket listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the event loop, closes every client and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("control plane: cannot signal the stop: {e}");
        }
        if thread.join().is_err() {
            log::error!("control plane: the thread panicked");
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("control plane: removing {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Listens on `path` (mode 0600) and serves it on a new thread.
///
/// A stale socket left at `path` by a dead daemon is replaced; a live one
/// (something accepts connections) or any other file is an error.
pub fn spawn_control_plane(path: &Path, state: Arc<DeviceState>) -> io::Result<ControlHandle> {
    let listener = bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let inode = (meta.dev(), meta.ino());
    let started = start(path, listener, state);
    if started.is_err() {
        let _ = std::fs::remove_file(path);
    }
    let (stop, thread) = started?;
    log::info!("control socket listening on {}", path.display());
    Ok(ControlHandle {
        path: path.to_owned(),
        inode,
        stop,
        thread: Some(thread),
    })
}

fn start(
    path: &Path,
    listener: UnixListener,
    state: Arc<DeviceState>,
) -> io::Result<(EventFd, JoinHandle<()>)> {
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stop_rx = stop.try_clone()?;
    // The subscribers hold `Rc`s, so the manager is built on its thread;
    // this channel brings its creation error back.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("dmabuf-control".into())
        .spawn(move || match EventManager::<Node>::new() {
            Ok(em) => {
                let _ = tx.send(Ok(()));
                serve(em, listener, stop_rx, state);
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(format!("event manager: {e:?}"))));
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok((stop, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other("control plane thread ended at start"))
        }
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    // A live socket or any other file at `path` is refused; a stale socket
    // (nothing accepts on it) is replaced.
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let is_socket = meta.file_type().is_socket();
            if !is_socket || UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} exists and is {}",
                        path.display(),
                        if is_socket {
                            "a live socket"
                        } else {
                            "not a socket"
                        }
                    ),
                ));
            }
            log::info!("replacing the stale socket {}", path.display());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind in a fresh directory only we can enter, make the socket 0600,
    // then move it into place: under a permissive umask there is no moment
    // at which another user could connect.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(".dmabuf-ctl-{}-{}", std::process::id(), unique()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("ctl");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// A number no other call in this process gets (private directory names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What the subscribers and the loop hand to each other (one thread).
#[derive(Debug)]
struct Shared {
    /// Accepted sockets the loop turns into subscribers.
    accepted: Vec<UnixStream>,
    /// Client subscribers the loop removes.
    closed: Vec<SubscriberId>,
    /// Evictions the exporter finished.
    finished: Vec<(HostOpId, Result<(), HostError>)>,
    /// Parked evictions and the client waiting for each.
    waiting: HashMap<HostOpId, SubscriberId>,
    next_op: HostOpId,
    clients: usize,
    /// `accept` ran out of fds; the listener is off until the loop retries.
    listener_paused: bool,
    stop: bool,
}

type SharedRef = Rc<RefCell<Shared>>;

fn serve(
    mut em: EventManager<Node>,
    listener: UnixListener,
    stop: EventFd,
    state: Arc<DeviceState>,
) {
    let shared: SharedRef = Rc::new(RefCell::new(Shared {
        accepted: Vec::new(),
        closed: Vec::new(),
        finished: Vec::new(),
        waiting: HashMap::new(),
        next_op: 1,
        clients: 0,
        listener_paused: false,
        stop: false,
    }));
    let listener_fd = listener.as_raw_fd();
    let listener_id = em.add_subscriber(Node::Listener(Acceptor {
        listener,
        shared: shared.clone(),
    }));
    em.add_subscriber(Node::Wakeups(Wakeups {
        stop,
        state: state.clone(),
        shared: shared.clone(),
    }));
    loop {
        let paused = shared.borrow().listener_paused;
        let timeout = if paused { ACCEPT_RETRY_MS } else { -1 };
        if let Err(e) = em.run_with_timeout(timeout) {
            log::error!("control plane: event loop failed: {e:?}");
            return;
        }
        if shared.borrow().stop {
            return;
        }
        if paused {
            shared.borrow_mut().listener_paused = false;
            let resumed = em
                .event_ops(listener_id)
                .and_then(|ops| ops.modify(Events::new_raw(listener_fd, EventSet::IN)));
            if let Err(e) = resumed {
                log::error!("control plane: cannot listen again: {e:?}");
            }
        }
        after_run(&mut em, &shared, &state);
    }
}

/// The loop's share of the work: drop closed clients, add accepted ones,
/// answer finished evictions.
fn after_run(em: &mut EventManager<Node>, shared: &SharedRef, state: &Arc<DeviceState>) {
    let closed = std::mem::take(&mut shared.borrow_mut().closed);
    for id in closed {
        remove_client(em, shared, id);
    }
    let accepted = std::mem::take(&mut shared.borrow_mut().accepted);
    for stream in accepted {
        let conn = Connection::new(stream, state.clone(), shared.clone());
        let id = em.add_subscriber(Node::Client(conn));
        shared.borrow_mut().clients += 1;
        if let Ok(Node::Client(c)) = em.subscriber_mut(id) {
            c.id = Some(id);
            if c.closed {
                remove_client(em, shared, id);
            }
        }
    }
    let finished = std::mem::take(&mut shared.borrow_mut().finished);
    for (op, result) in finished {
        let client = shared.borrow_mut().waiting.remove(&op);
        let Some(id) = client else {
            log::debug!("control plane: eviction {op} finished with nobody waiting");
            continue;
        };
        let update = match em.subscriber_mut(id) {
            Ok(Node::Client(c)) => {
                c.finish_evict(op, result);
                c.update()
            }
            _ => continue,
        };
        apply(em, shared, id, update);
    }
}

/// Carries out what a client's [`Connection::update`] asked for, from
/// outside its `process`.
fn apply(em: &mut EventManager<Node>, shared: &SharedRef, id: SubscriberId, update: Update) {
    match update {
        Update::Keep => {}
        Update::Close => remove_client(em, shared, id),
        Update::Interest(events) => {
            let modified = em.event_ops(id).and_then(|ops| ops.modify(events));
            if let Err(e) = modified {
                log::warn!("control plane: client interest: {e:?}");
                remove_client(em, shared, id);
            }
        }
    }
}

fn remove_client(em: &mut EventManager<Node>, shared: &SharedRef, id: SubscriberId) {
    // Dropping the subscriber closes the socket, after the manager has
    // taken its fd off the epoll set.
    if em.remove_subscriber(id).is_ok() {
        let mut s = shared.borrow_mut();
        s.clients = s.clients.saturating_sub(1);
        // A parked eviction goes on; its answer has nowhere to go.
        s.waiting.retain(|_, client| *client != id);
    }
}

/// The subscribers of the control plane's event manager.
#[derive(Debug)]
enum Node {
    Listener(Acceptor),
    Client(Connection),
    Wakeups(Wakeups),
}

impl MutEventSubscriber for Node {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self {
            Node::Listener(a) => a.process(events, ops),
            Node::Client(c) => c.process(events, ops),
            Node::Wakeups(w) => w.process(events),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        match self {
            Node::Listener(a) => a.init(ops),
            Node::Client(c) => c.init(ops),
            Node::Wakeups(w) => w.init(ops),
        }
    }
}

/// The listening socket.
#[derive(Debug)]
struct Acceptor {
    listener: UnixListener,
    shared: SharedRef,
}

impl Acceptor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("control plane: cannot watch the listener: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds (EMFILE, ENFILE): the listener stays
                    // readable, so stop watching it for a while instead of
                    // spinning on it.
                    log::warn!("control plane: accept: {e}");
                    let _ = ops.modify(Events::new(&self.listener, EventSet::empty()));
                    self.shared.borrow_mut().listener_paused = true;
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream) {
        let mut s = self.shared.borrow_mut();
        if s.clients + s.accepted.len() >= MAX_CLIENTS {
            let line = wire::response_line(&wire::error(format!(
                "too many control clients (at most {MAX_CLIENTS})"
            )));
            let _ = send(&stream, &line, SendFlags::NOSIGNAL | SendFlags::DONTWAIT);
            return;
        }
        match stream.set_nonblocking(true) {
            Ok(()) => s.accepted.push(stream),
            Err(e) => log::warn!("control plane: client socket: {e}"),
        }
    }
}

/// The device's `control_wake` eventfd and the stop eventfd.
#[derive(Debug)]
struct Wakeups {
    stop: EventFd,
    state: Arc<DeviceState>,
    shared: SharedRef,
}

impl Wakeups {
    fn init(&mut self, ops: &mut EventOps) {
        let wake = self.state.control_wake().as_raw_fd();
        for fd in [self.stop.as_raw_fd(), wake] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("control plane: cannot watch eventfd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events) {
        if events.fd() == self.stop.as_raw_fd() {
            self.shared.borrow_mut().stop = true;
            return;
        }
        // The device writes this after every change; it is non-blocking,
        // and an empty counter (EAGAIN) just means someone read it first.
        let _ = self.state.control_wake().read();
        let mut shared = self.shared.borrow_mut();
        if shared.waiting.is_empty() {
            return;
        }
        let done = self.state.lock().take_host_completions();
        shared.finished.extend(done);
    }
}

/// What a client's registration needs after something happened to it.
#[derive(Debug, Clone, Copy)]
enum Update {
    Keep,
    Interest(Events),
    Close,
}

/// What one read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Data,
    Eof,
    Again,
    Failed,
}

/// The next thing in a client's input.
#[derive(Debug)]
enum Next {
    Line(Line),
    /// A line longer than [`MAX_LINE`] (dropped, with its fds).
    TooLong,
    /// No complete line yet.
    Nothing,
}

/// One request line and the fds that came with it.
#[derive(Debug)]
struct Line {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// One client connection.
///
/// Requests are handled one at a time, in order: while an answer is not
/// fully written, or an eviction is parked, nothing more is read, so a
/// client that does not read its answers cannot make the daemon buffer
/// without bound.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    /// Set by the loop right after the subscriber is added.
    id: Option<SubscriberId>,
    state: Arc<DeviceState>,
    shared: SharedRef,
    /// Bytes received and not yet handled.
    input: Vec<u8>,
    /// Stream offset of `input[0]`.
    base: u64,
    /// Stream offset after the last byte received.
    received: u64,
    /// Received fds, each tagged with the stream offset of the last byte of
    /// the read that brought it. The kernel ends a read with the segment
    /// that carries fds, and a client sends an fd with the `sendmsg` of its
    /// line, so that byte lies in the fd's line.
    fds: VecDeque<(u64, OwnedFd)>,
    /// The current line grew past [`MAX_LINE`]; skip to its newline.
    skipping: bool,
    /// Answer bytes not yet written.
    output: Vec<u8>,
    /// A parked eviction: its op and what the answer needs.
    waiting: Option<(HostOpId, uuid::Uuid, u64)>,
    /// The client shut down its sending side.
    eof: bool,
    /// Writing failed: the client is gone; what it sent is still carried out.
    peer_gone: bool,
    closed: bool,
    registered: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: Arc<DeviceState>, shared: SharedRef) -> Self {
        Connection {
            stream,
            id: None,
            state,
            shared,
            input: Vec::new(),
            base: 0,
            received: 0,
            fds: VecDeque::new(),
            skipping: false,
            output: Vec::new(),
            waiting: None,
            eof: false,
            peer_gone: false,
            closed: false,
            registered: EventSet::empty(),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let want = self.wanted();
        match ops.add(Events::new(&self.stream, want)) {
            Ok(()) => self.registered = want,
            Err(e) => {
                log::warn!("control plane: cannot watch a client: {e:?}");
                self.closed = true;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.closed {
            return;
        }
        let set = events.event_set();
        if set.contains(EventSet::ERROR) {
            self.close();
        } else {
            if set.contains(EventSet::OUT) {
                self.flush();
            }
            if set.contains(EventSet::HANG_UP) {
                self.drain_after_hang_up();
            } else {
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                    self.read();
                }
                self.advance();
            }
        }
        match self.update() {
            Update::Keep | Update::Close => {}
            Update::Interest(events) => {
                if let Err(e) = ops.modify(events) {
                    log::warn!("control plane: client interest: {e:?}");
                    self.close();
                }
            }
        }
    }

    /// Tells the loop to drop this client.
    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(id) = self.id {
            self.shared.borrow_mut().closed.push(id);
        }
    }

    /// What the client needs next: an interest change or removal. Marks
    /// the new interest as registered (the caller applies it).
    fn update(&mut self) -> Update {
        if self.closed {
            return Update::Close;
        }
        let want = self.wanted();
        if want == self.registered {
            return Update::Keep;
        }
        self.registered = want;
        Update::Interest(Events::new(&self.stream, want))
    }

    fn wanted(&self) -> EventSet {
        if !self.output.is_empty() {
            EventSet::OUT
        } else if self.waiting.is_some() || self.eof {
            EventSet::empty()
        } else {
            EventSet::IN | EventSet::READ_HANG_UP
        }
    }

    /// The client is gone for good (`HANG_UP`, which cannot be masked):
    /// carry out what it sent, answer nobody, close. Lines behind a parked
    /// eviction are dropped with it; the eviction itself goes on.
    fn drain_after_hang_up(&mut self) {
        self.peer_gone = true;
        self.output.clear();
        loop {
            self.advance();
            if self.closed || self.waiting.is_some() {
                break;
            }
            match self.read() {
                Read::Data => {}
                Read::Eof => {
                    self.advance();
                    break;
                }
                Read::Again | Read::Failed => break,
            }
        }
        self.close();
    }

    /// One `recvmsg`: bytes into `input`, fds into `fds`.
    fn read(&mut self) -> Read {
        let mut buf = [0u8; READ_CHUNK];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_READ))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = recvmsg(
            &self.stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        );
        let msg = match received {
            Ok(msg) => msg,
            Err(Errno::AGAIN | Errno::INTR) => return Read::Again,
            Err(e) => {
                log::debug!("control plane: client read: {e}");
                self.close();
                return Read::Failed;
            }
        };
        if msg.bytes == 0 {
            self.eof = true;
            return Read::Eof;
        }
        let n = msg.bytes.min(buf.len());
        let tag = self.received + n as u64 - 1;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    if self.fds.len() < MAX_QUEUED_FDS {
                        self.fds.push_back((tag, fd));
                    }
                }
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            log::warn!("control plane: a client sent more than {FDS_PER_READ} fds at once");
        }
        self.input.extend_from_slice(&buf[..n]);
        self.received += n as u64;
        Read::Data
    }

    /// Handles complete lines until one must wait; closes after the last
    /// answer once the client has shut down its side.
    fn advance(&mut self) {
        while !self.closed && self.waiting.is_none() && self.output.is_empty() {
            match self.next_line() {
                Next::Line(line) => self.handle(line),
                Next::TooLong => self.respond(wire::error(format!(
                    "request line longer than {MAX_LINE} bytes"
                ))),
                Next::Nothing => break,
            }
            self.flush();
        }
        let idle = self.waiting.is_none() && self.output.is_empty() && self.input.is_empty();
        if self.eof && idle {
            self.close();
        }
    }

    fn next_line(&mut self) -> Next {
        loop {
            let (len, consumed) = match self.input.iter().position(|b| *b == b'\n') {
                Some(i) => (i, i + 1),
                None if self.input.len() > MAX_LINE => {
                    // Too long: answer once, then drop bytes up to its newline.
                    let n = self.input.len();
                    self.input.clear();
                    self.base += n as u64;
                    self.drop_fds_before(self.base);
                    if std::mem::replace(&mut self.skipping, true) {
                        return Next::Nothing;
                    }
                    return Next::TooLong;
                }
                // At end of input, an unterminated last line still counts.
                None if self.eof && !self.input.is_empty() => (self.input.len(), self.input.len()),
                None => return Next::Nothing,
            };
            let end = self.base + consumed as u64;
            let mut bytes: Vec<u8> = self.input.drain(..consumed).collect();
            bytes.truncate(len);
            self.base = end;
            let mut fds = Vec::new();
            while self.fds.front().is_some_and(|(tag, _)| *tag < end) {
                if let Some((_, fd)) = self.fds.pop_front() {
                    fds.push(fd);
                }
            }
            if std::mem::take(&mut self.skipping) {
                // The tail of a line already answered as too long.
                continue;
            }
            if len > MAX_LINE {
                return Next::TooLong;
            }
            return Next::Line(Line { bytes, fds });
        }
    }

    fn drop_fds_before(&mut self, offset: u64) {
        self.fds.retain(|(tag, _)| *tag >= offset);
    }

    /// Queues an answer (dropped when the client is gone).
    fn respond(&mut self, response: Value) {
        if !self.peer_gone {
            self.output
                .extend_from_slice(&wire::response_line(&response));
        }
    }

    fn flush(&mut self) {
        while !self.output.is_empty() {
            match send(
                &self.stream,
                &self.output,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR) => {}
                Err(e) => {
                    log::debug!("control plane: client write: {e}");
                    self.peer_gone = true;
                    self.output.clear();
                }
            }
        }
    }
}
