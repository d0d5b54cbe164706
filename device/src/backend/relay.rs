// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A message relay between the front-end's connection and the
//! `VhostUserDaemon` serving it, which sees two things vhost-user-backend
//! does not hand to a back-end:
//!
//! - the protocol features the front-end acked (`SET_PROTOCOL_FEATURES`):
//!   whether `REPLY_ACK`, `SHMEM` and `SHARED_OBJECT` are live;
//! - the back-end channel socket itself (`SET_BACKEND_REQ_FD`): vhost-user-
//!   backend wraps it in a `vhost::Backend`, whose socket is private and
//!   whose `shared_object_lookup` cannot receive the fd a `LOOKUP` reply
//!   carries (`docs/shared-objects.md`). The relay keeps a duplicate, and
//!   [`super::channel`] speaks the channel on it.
//!
//! The relay forwards every message unchanged, one at a time: it reads a
//! header and exactly its payload (so the fds that came with a message stay
//! with it) and writes them with one `sendmsg`. It does so in both
//! directions; only front-end to back-end messages are looked at.
//!
//! The daemon side connects to a private listener of ours
//! ([`InternalEndpoint`]): vhost-user-backend builds a connection only from
//! a listener or a path, never from a socket pair.
//!
//! Every fd that comes with a message (`SCM_RIGHTS`, either way) is
//! forwarded and then closed here; a hang-up on either side ends both
//! directions, and [`Relay::stop`] joins the threads.

use std::fs::DirBuilder;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};

const HEADER_SIZE: usize = 12;

/// What the relay learned about one connection.
#[derive(Debug, Default)]
pub struct ConnectionInfo {
    acked_protocol_features: AtomicU64,
    channel_socket: Mutex<Option<OwnedFd>>,
    /// Messages the front-end sent.
    messages: AtomicU64,
}

impl ConnectionInfo {
    /// How many messages the front-end sent on this connection.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// The protocol features of the last `SET_PROTOCOL_FEATURES`.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(
            self.acked_protocol_features.load(Ordering::Acquire),
        )
    }

    /// The back-end channel socket of the last `SET_BACKEND_REQ_FD`.
    pub fn take_channel_socket(&self) -> Option<OwnedFd> {
        self.channel_socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn observe(&self, request: u32, body: &[u8], fds: &[OwnedFd]) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        if request == u32::from(FrontendReq::SET_PROTOCOL_FEATURES) {
            if let Ok(bytes) = <[u8; 8]>::try_from(body) {
                self.acked_protocol_features
                    .store(u64::from_ne_bytes(bytes), Ordering::Release);
            }
        } else if request == u32::from(FrontendReq::RESET_OWNER) {
            self.acked_protocol_features.store(0, Ordering::Release);
        } else if request == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
            // Recorded before the message is forwarded, so the back-end's
            // `set_backend_req_fd` always finds it.
            let dup = match fds {
                [fd] => fd.try_clone().ok(),
                _ => None,
            };
            *self
                .channel_socket
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = dup;
        }
    }
}

/// Where the connection's `VhostUserDaemon` connects to the relay.
///
/// vhost-user-backend 0.24 builds a connection only from a `Listener`
/// (`VhostUserDaemon::start`, which accepts) or from a socket path
/// (`start_client`, which connects); it cannot take a socket pair. So the
/// daemon connects (`start_client`) to a listener of ours on a path in a
/// fresh directory that only this user can enter (mode 0700; another user
/// cannot even reach the socket), and [`InternalEndpoint::accept_own`]
/// takes only a connection whose peer is this very process
/// (`SO_PEERCRED`). The daemon's end is never one another process could
/// have made, and nobody else's connection is ever served. The path and
/// its directory go away with the endpoint, right after the accept.
pub struct InternalEndpoint {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl std::fmt::Debug for InternalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalEndpoint")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Name of the directory an [`InternalEndpoint`] lives in.
const ENDPOINT_PREFIX: &str = "vhost-dmabuf-";

impl InternalEndpoint {
    /// Binds a listener in a new private directory under the first of
    /// `bases` that allows it (the temporary directory, then the directory
    /// of the guest's socket, say).
    pub fn new(bases: &[&Path]) -> std::io::Result<InternalEndpoint> {
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no directory to use");
        for base in bases {
            for _ in 0..4 {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let dir = base.join(format!("{ENDPOINT_PREFIX}{}", &id[..16]));
                match DirBuilder::new().mode(0o700).create(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
                let path = dir.join("s");
                match UnixListener::bind(&path) {
                    Ok(listener) => {
                        return Ok(InternalEndpoint {
                            dir,
                            path,
                            listener,
                        })
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir(&dir);
                        last = e;
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// The path for `VhostUserDaemon::start_client`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After the daemon connected: its connection, found by the peer's
    /// process id. Connections of other processes are closed unserved.
    pub fn accept_own(&self) -> std::io::Result<UnixStream> {
        self.listener.set_nonblocking(true)?;
        let me = rustix::process::getpid();
        loop {
            // WouldBlock here: the daemon's connection never came.
            let (stream, _) = self.listener.accept()?;
            match rustix::net::sockopt::socket_peercred(&stream) {
                Ok(cred) if cred.pid == me => {
                    stream.set_nonblocking(false)?;
                    return Ok(stream);
                }
                Ok(cred) => log::warn!(
                    "internal vhost-user socket: refused a connection from pid {} uid {}",
                    cred.pid.as_raw_nonzero(),
                    cred.uid.as_raw()
                ),
                Err(e) => log::warn!("internal vhost-user socket: SO_PEERCRED: {e}"),
            }
        }
    }
}

impl Drop for InternalEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The two threads that carry one connection's messages.
#[derive(Debug)]
pub struct Relay {
    front: UnixStream,
    back: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between the front-end's connection `front` and the daemon's
    /// `back`, recording what it sees in `info`.
    pub fn start(
        front: UnixStream,
        back: UnixStream,
        info: Arc<ConnectionInfo>,
        name: &str,
    ) -> std::io::Result<Relay> {
        let (f_in, b_out) = (front.try_clone()?, back.try_clone()?);
        let (b_in, f_out) = (back.try_clone()?, front.try_clone()?);
        let to_backend = std::thread::Builder::new()
            .name(format!("{name}-in"))
            .spawn({
                let name = name.to_owned();
                move || carry(&f_in, &b_out, Some(&info), &name)
            })?;
        let to_frontend = std::thread::Builder::new()
            .name(format!("{name}-out"))
            .spawn({
                let name = name.to_owned();
                move || carry(&b_in, &f_out, None, &name)
            })?;
        Ok(Relay {
            front,
            back,
            threads: vec![to_backend, to_frontend],
        })
    }

    /// Hangs up both sides and waits for the threads.
    pub fn stop(mut self) {
        let _ = self.front.shutdown(Shutdown::Both);
        let _ = self.back.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Forwards messages from `from` to `to` until either side ends, then
/// hangs up both (so the other direction ends too). `info` is given for
/// the front-end's direction only.
fn carry(from: &UnixStream, to: &UnixStream, info: Option<&ConnectionInfo>, name: &str) {
    if let Err(e) = carry_messages(from, to, info, name) {
        log::debug!("{name}: vhost-user relay: {e}");
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

pub(crate) fn carry_messages(
    from: &UnixStream,
    to: &UnixStream,
    info: Option<&ConnectionInfo>,
    name: &str,
) -> std::io::Result<()> {
    loop {
        let mut fds = Vec::new();
        let mut header = [0u8; HEADER_SIZE];
        if !receive_exact(from, &mut header, &mut fds)? {
            return Ok(());
        }
        let word = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        let size = word(8) as usize;
        if size > MAX_MSG_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message {} of {size} bytes", word(0)),
            ));
        }
        let mut body = vec![0u8; size];
        if size > 0 && !receive_exact(from, &mut body, &mut fds)? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // vhost-user allows this many per message, and the receiving end
        // has room for no more. A front-end can still spread more over
        // several writes of one message: such a message is refused whole
        // (the space `send_message` gives them may hold a few more).
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "message {} with {} fds, more than {MAX_ATTACHED_FD_ENTRIES}",
                    word(0),
                    fds.len()
                ),
            ));
        }
        if let Some(info) = info {
            info.observe(word(0), &body, &fds);
        }
        log::debug!(
            "{name}: vhost-user {} {} ({size} bytes, {} fds, flags {:#x})",
            if info.is_some() {
                "front-end:"
            } else {
                "reply to"
            },
            request_name(word(0)),
            fds.len(),
            word(4)
        );
        send_message(to, &header, &body, &fds)?;
    }
}

/// The name of front-end request `code` (`SET_MEM_TABLE`), or its number.
fn request_name(code: u32) -> String {
    match FrontendReq::try_from(code) {
        Ok(req) => format!("{req:?}"),
        Err(()) => format!("request {code}"),
    }
}

/// Fills `buf`, collecting fds; false on a clean end before any byte.
fn receive_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += msg.bytes;
    }
    Ok(true)
}

fn send_message(
    sock: &UnixStream,
    header: &[u8],
    body: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(std::io::Error::other("too many fds in one message"));
    }
    let mut bytes = Vec::with_capacity(header.len() + body.len());
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(body);
    let mut sent = 0;
    let mut first = true;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let n = if first {
            sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            sendmsg(
                sock,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                first = false;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn message(request: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&request.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes());
        out.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn relay_forwards_messages_and_records_features_and_the_channel() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, mut back_peer) = UnixStream::pair().expect("pair");
        let info = Arc::new(ConnectionInfo::default());
        let relay = Relay::start(front, back, Arc::clone(&info), "test-relay").expect("relay");

        let features = (1u64 << 18) | (1 << 3);
        let m = message(16, &features.to_ne_bytes());
        (&front_peer).write_all(&m).expect("send");
        let mut got = vec![0u8; m.len()];
        back_peer.read_exact(&mut got).expect("forwarded");
        assert_eq!(got, m);
        assert_eq!(info.acked_protocol_features().bits(), features);

        // SET_BACKEND_REQ_FD with one fd: forwarded with it, and kept.
        let (chan_ours, mut chan_theirs) = UnixStream::pair().expect("pair");
        let m = message(21, &0u64.to_ne_bytes());
        send_message(
            &front_peer,
            &m[..HEADER_SIZE],
            &m[HEADER_SIZE..],
            &[OwnedFd::from(chan_ours)],
        )
        .expect("send with fd");
        let mut header = [0u8; HEADER_SIZE];
        let mut fds = Vec::new();
        assert!(receive_exact(&back_peer, &mut header, &mut fds).expect("header"));
        let mut body = [0u8; 8];
        assert!(receive_exact(&back_peer, &mut body, &mut fds).expect("body"));
        assert_eq!(fds.len(), 1, "the fd travels with its message");
        let kept = info.take_channel_socket().expect("a dup of the channel");
        UnixStream::from(kept).write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        chan_theirs.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"x");

        // Back-end to front-end, then a hang-up ends both directions.
        let reply = message(1, &7u64.to_ne_bytes());
        back_peer.write_all(&reply).expect("reply");
        let mut got = vec![0u8; reply.len()];
        (&front_peer).read_exact(&mut got).expect("reply forwarded");
        assert_eq!(got, reply);
        drop(front_peer);
        let mut rest = Vec::new();
        back_peer.read_to_end(&mut rest).expect("EOF");
        relay.stop();
    }

    #[test]
    fn oversized_messages_end_the_relay() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, mut back_peer) = UnixStream::pair().expect("pair");
        let relay = Relay::start(front, back, Arc::default(), "test-relay").expect("relay");
        let mut m = message(1, &[]);
        m[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_ne_bytes());
        (&front_peer).write_all(&m).expect("send");
        let mut rest = Vec::new();
        back_peer.read_to_end(&mut rest).expect("EOF");
        assert!(rest.is_empty(), "nothing forwarded");
        relay.stop();
    }

    /// A message may carry at most `MAX_ATTACHED_FD_ENTRIES` fds; more,
    /// sent over several writes of one message, end the relay with nothing
    /// of that message forwarded (found by the `relay_message` fuzz target:
    /// 34 fds still fitted the send buffer and went through).
    #[test]
    fn messages_with_more_fds_than_vhost_user_allows_end_the_relay() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, back_peer) = UnixStream::pair().expect("pair");
        let fds = |n: usize| -> Vec<OwnedFd> {
            (0..n)
                .map(|_| {
                    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
                        .expect("eventfd")
                })
                .collect()
        };
        // A whole message with 32 fds, then one whose 33 come in two writes.
        let m = message(5, &[0; 8]);
        send_message(&front_peer, &m[..HEADER_SIZE], &m[HEADER_SIZE..], &fds(32)).expect("send");
        send_message(&front_peer, &m[..4], &[], &fds(20)).expect("send");
        send_message(&front_peer, &m[4..HEADER_SIZE], &m[HEADER_SIZE..], &fds(13)).expect("send");
        front_peer.shutdown(Shutdown::Write).expect("shutdown");
        let info = ConnectionInfo::default();
        let result = carry_messages(&front, &back, Some(&info), "test-relay");
        assert_eq!(
            result.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidData)
        );
        assert_eq!(info.messages(), 1, "the second message is not one");
        back.shutdown(Shutdown::Write).expect("shutdown");
        let mut header = [0u8; HEADER_SIZE];
        let mut body = [0u8; 8];
        let mut got = Vec::new();
        assert!(receive_exact(&back_peer, &mut header, &mut got).expect("header"));
        assert!(receive_exact(&back_peer, &mut body, &mut got).expect("body"));
        assert_eq!(got.len(), 32, "the first message went with its fds");
        assert!(!receive_exact(&back_peer, &mut header, &mut got).expect("end"));
    }

    /// Another process (a forked child, as any local program could) that
    /// connects to the endpoint before the daemon is never the one
    /// accepted; the directory is private and goes away with the endpoint.
    #[test]
    fn the_internal_endpoint_accepts_only_this_process() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;

        let tmp = tempfile::tempdir().expect("tempdir");
        let endpoint = InternalEndpoint::new(&[tmp.path()]).expect("endpoint");
        let dir = endpoint.path().parent().expect("a directory").to_path_buf();
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "only this user may reach the socket");

        // Everything the child needs is prepared before the fork: it only
        // makes system calls.
        // SAFETY: all-zero bytes are a valid `sockaddr_un`.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(endpoint.path().as_os_str().as_bytes())
        {
            *d = *s as libc::c_char;
        }
        let mut pipe = [0i32; 2];
        // SAFETY: `pipe` has room for the two fds.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child calls only async-signal-safe functions (socket,
        // connect, write, alarm, pause, _exit) on memory prepared above.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above; `addr` and `pipe` are valid in the child.
            unsafe {
                libc::alarm(30);
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let rc = libc::connect(
                    fd,
                    std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                let ok: u8 = u8::from(rc == 0);
                libc::write(pipe[1], std::ptr::addr_of!(ok).cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        assert!(child > 0, "fork");
        let mut ok = 0u8;
        // SAFETY: reads one byte into `ok` from the pipe we own.
        let n = unsafe { libc::read(pipe[0], std::ptr::addr_of_mut!(ok).cast(), 1) };
        assert_eq!((n, ok), (1, 1), "the other process is connected first");

        let ours = UnixStream::connect(endpoint.path()).expect("connect");
        let mut accepted = endpoint.accept_own().expect("ours is accepted");
        (&ours).write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"x", "the accepted connection is ours");
        assert_eq!(
            endpoint.accept_own().map(drop).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "the other process's connection was refused, nothing waits"
        );

        // SAFETY: `child` is our child process; we reap it.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        drop(endpoint);
        assert!(!dir.exists(), "the directory goes with the endpoint");
    }
}
