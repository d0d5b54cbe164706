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
//! The daemon side is reached through a listener with a random abstract
//! name that accepts one connection (vhost-user-backend only serves what a
//! `Listener` accepts); [`InternalListener::verify`] makes sure nobody else
//! connected to it first.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
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
use vhost::vhost_user::Listener;

const HEADER_SIZE: usize = 12;

/// What the relay learned about one connection.
#[derive(Debug, Default)]
pub struct ConnectionInfo {
    acked_protocol_features: AtomicU64,
    channel_socket: Mutex<Option<OwnedFd>>,
}

impl ConnectionInfo {
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

/// The listener the connection's `VhostUserDaemon` accepts the relay from.
pub struct InternalListener {
    listener: Listener,
}

impl std::fmt::Debug for InternalListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd;
        f.debug_struct("InternalListener")
            .field("fd", &self.listener.as_raw_fd())
            .finish()
    }
}

impl InternalListener {
    /// Binds a fresh listener under a random abstract name and connects to
    /// it; returns the listener (for `VhostUserDaemon::start`) and the
    /// relay's end of the connection.
    pub fn connected() -> std::io::Result<(InternalListener, UnixStream)> {
        let name = format!("vhost-device-dmabuf/{}", uuid::Uuid::new_v4());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        let ours = UnixStream::connect_addr(&addr)?;
        Ok((
            InternalListener {
                listener: Listener::from(listener),
            },
            ours,
        ))
    }

    pub fn listener(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// After the daemon accepted one connection: true when no other
    /// connection is pending, i.e. it accepted ours (ours connected first,
    /// right after the bind). Anything else means someone raced us to the
    /// name; the caller drops the connection.
    pub fn verify(&self) -> bool {
        if self.listener.set_nonblocking(true).is_err() {
            return false;
        }
        matches!(self.listener.accept(), Ok(None))
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
            .spawn(move || carry(&f_in, &b_out, Some(&info)))?;
        let to_frontend = std::thread::Builder::new()
            .name(format!("{name}-out"))
            .spawn(move || carry(&b_in, &f_out, None))?;
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
/// hangs up both (so the other direction ends too).
fn carry(from: &UnixStream, to: &UnixStream, info: Option<&ConnectionInfo>) {
    if let Err(e) = carry_messages(from, to, info) {
        log::debug!("vhost-user relay: {e}");
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn carry_messages(
    from: &UnixStream,
    to: &UnixStream,
    info: Option<&ConnectionInfo>,
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
        if let Some(info) = info {
            info.observe(word(0), &body, &fds);
        }
        send_message(to, &header, &body, &fds)?;
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

    #[test]
    fn the_internal_listener_accepts_only_the_relay() {
        let (mut internal, ours) = InternalListener::connected().expect("listener");
        let accepted = internal.listener().accept().expect("accept");
        assert!(accepted.is_some());
        assert!(internal.verify());
        drop(ours);
    }
}
