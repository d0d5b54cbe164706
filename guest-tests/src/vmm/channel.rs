// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The front-end's end of the vhost-user back-end request channel
//! (`SET_BACKEND_REQ_FD`): `SHMEM_MAP`/`SHMEM_UNMAP` into the
//! [`ShmWindow`], and `SHARED_OBJECT_ADD`/`REMOVE`/`LOOKUP` against the
//! VM's shared-object table.
//!
//! Hand-rolled rather than vhost's `FrontendReqHandler` because that one
//! expects an fd *in* the `LOOKUP` request and answers without one, while
//! the vhost-user spec (and QEMU) have the front-end reply with a `u64` and
//! the dma-buf fd. This end follows the spec and tolerates the vhost 0.18
//! back-end: an fd attached to a `LOOKUP` request is ignored and closed.
//!
//! Wire format (native little-endian): `u32 request; u32 flags; u32 size`,
//! then `size` bytes; `flags` bit 0x4 is REPLY, 0x8 NEED_REPLY, version 1.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use uuid::Uuid;
use vhost::vhost_user::message::VhostUserSharedMsg;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::shm::ShmWindow;

/// `BackendReq` numbers (vhost-user spec, "Back-end message types").
pub mod backend_req {
    pub const SHARED_OBJECT_ADD: u32 = 6;
    pub const SHARED_OBJECT_REMOVE: u32 = 7;
    pub const SHARED_OBJECT_LOOKUP: u32 = 8;
    pub const SHMEM_MAP: u32 = 9;
    pub const SHMEM_UNMAP: u32 = 10;
}

const HDR_SIZE: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest body the channel accepts (the spec's messages are all small).
const MAX_BODY: usize = 4096;
/// `VhostUserMMap`: shmid u8, 7 padding, fd_offset, shm_offset, len, flags.
const MMAP_MSG_SIZE: usize = 40;
const MMAP_FLAG_WRITABLE: u64 = 0x1;

/// Who published a UUID in the VM's shared-object table.
#[derive(Debug, Clone)]
pub enum SharedObjectSource {
    /// The back-end under test, with `SHARED_OBJECT_ADD`: a lookup asks it
    /// back with `GET_SHARED_OBJECT`, as QEMU does for vhost-user exporters.
    Backend,
    /// Another device of the VM (a test fixture): the fd is the object.
    External(Arc<OwnedFd>),
}

/// One back-end request as the channel served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMessage {
    pub request: u32,
    pub flags: u32,
    pub uuid: Option<Uuid>,
    /// The `u64` replied (0 = success), if a reply was sent.
    pub reply: Option<u64>,
    /// Whether the reply carried an fd (LOOKUP).
    pub fd_sent: bool,
    /// Fds that came with the request.
    pub fds_received: usize,
}

/// One back-end request as it arrived, before the channel handled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub request: u32,
    /// The header flags (`NEED_REPLY` is 0x8).
    pub flags: u32,
    /// The UUID of a shared-object request.
    pub uuid: Option<Uuid>,
    /// `(shm_offset, len)` of a `SHMEM_MAP` or `SHMEM_UNMAP`.
    pub shm_range: Option<(u64, u64)>,
}

/// What the channel thread shares with the VMM.
#[derive(Debug, Default)]
pub struct FrontendState {
    pub(crate) shm: Option<Arc<ShmWindow>>,
    objects: Mutex<HashMap<Uuid, SharedObjectSource>>,
    log: Mutex<Vec<BackendMessage>>,
    frontend: Mutex<Option<FrontendHandle>>,
    /// Every request as it arrived, before handling.
    received: Mutex<Vec<Received>>,
    /// While true, `LOOKUP`s wait unanswered.
    hold_lookups: Mutex<bool>,
    released: Condvar,
    /// Requests (by number) answered with a failure, whatever they ask.
    refused: Mutex<HashSet<u32>>,
    /// UUIDs whose `LOOKUP` succeeds without an fd.
    without_fd: Mutex<HashSet<Uuid>>,
}

/// The connection, for `GET_SHARED_OBJECT` on a lookup.
#[derive(Clone)]
struct FrontendHandle(Frontend);

impl std::fmt::Debug for FrontendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Frontend")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FrontendState {
    pub(crate) fn new(shm: Option<Arc<ShmWindow>>) -> Self {
        FrontendState {
            shm,
            ..FrontendState::default()
        }
    }

    pub(crate) fn set_frontend(&self, frontend: Option<Frontend>) {
        *lock(&self.frontend) = frontend.map(FrontendHandle);
    }

    /// UUIDs in the table and who published them.
    pub fn shared_objects(&self) -> Vec<(Uuid, SharedObjectSource)> {
        lock(&self.objects)
            .iter()
            .map(|(u, s)| (*u, s.clone()))
            .collect()
    }

    /// UUIDs the back-end published and has not removed.
    pub fn backend_objects(&self) -> Vec<Uuid> {
        lock(&self.objects)
            .iter()
            .filter(|(_, s)| matches!(s, SharedObjectSource::Backend))
            .map(|(u, _)| *u)
            .collect()
    }

    /// Publishes an object of "another device": `LOOKUP` of `uuid` answers
    /// with a duplicate of `fd`.
    pub fn publish_external(&self, uuid: Uuid, fd: OwnedFd) {
        lock(&self.objects).insert(uuid, SharedObjectSource::External(Arc::new(fd)));
    }

    /// Withdraws an entry, whoever published it.
    pub fn unpublish(&self, uuid: &Uuid) -> bool {
        lock(&self.objects).remove(uuid).is_some()
    }

    /// Every back-end request so far.
    pub fn log(&self) -> Vec<BackendMessage> {
        lock(&self.log).clone()
    }

    /// Every back-end request as it arrived, before it was handled (a
    /// held `LOOKUP` is here, not yet in the log).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.received).clone()
    }

    /// While `hold` is true, `LOOKUP`s wait unanswered: the back-end's
    /// worker stays blocked on the front-end.
    pub fn hold_lookups(&self, hold: bool) {
        *lock(&self.hold_lookups) = hold;
        self.released.notify_all();
    }

    /// Answers every back-end request numbered `request` with a failure
    /// from now on (nothing is published, mapped or looked up).
    pub fn refuse(&self, request: u32) {
        lock(&self.refused).insert(request);
    }

    /// Answers `LOOKUP` of `uuid` with success and no fd, as a front-end
    /// that does not follow the specification does.
    pub fn answer_lookup_without_fd(&self, uuid: Uuid) {
        lock(&self.without_fd).insert(uuid);
    }

    fn wait_while_held(&self) {
        let mut held = lock(&self.hold_lookups);
        while *held {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Handles one request; returns the reply value and an fd to send.
    fn handle(&self, request: u32, body: &[u8], fds: &[OwnedFd]) -> (u64, Option<OwnedFd>) {
        let errno = |e: i32| (-i64::from(e)) as u64;
        if lock(&self.refused).contains(&request) {
            if request == backend_req::SHARED_OBJECT_LOOKUP {
                self.wait_while_held();
            }
            return (errno(libc::EPERM), None);
        }
        match request {
            backend_req::SHARED_OBJECT_ADD => match parse_uuid(body) {
                Some(u) => {
                    lock(&self.objects).insert(u, SharedObjectSource::Backend);
                    (0, None)
                }
                None => (errno(libc::EINVAL), None),
            },
            backend_req::SHARED_OBJECT_REMOVE => match parse_uuid(body) {
                Some(u) => {
                    let mut objects = lock(&self.objects);
                    if matches!(objects.get(&u), Some(SharedObjectSource::Backend)) {
                        objects.remove(&u);
                        (0, None)
                    } else {
                        (errno(libc::ENOENT), None)
                    }
                }
                None => (errno(libc::EINVAL), None),
            },
            backend_req::SHARED_OBJECT_LOOKUP => match parse_uuid(body) {
                Some(u) if lock(&self.without_fd).contains(&u) => {
                    self.wait_while_held();
                    (0, None)
                }
                Some(u) => {
                    self.wait_while_held();
                    match self.lookup(&u) {
                        Ok(fd) => (0, Some(fd)),
                        Err(e) => (errno(e), None),
                    }
                }
                None => (errno(libc::EINVAL), None),
            },
            backend_req::SHMEM_MAP => {
                let (Some(shm), Some(m), [fd]) = (&self.shm, parse_mmap(body), fds) else {
                    return (errno(libc::EINVAL), None);
                };
                if m.shmid != 0 {
                    return (errno(libc::EINVAL), None);
                }
                let r = shm.map(m.shm_offset, m.len, fd.as_fd(), m.fd_offset, m.writable);
                (r.map_or_else(errno, |()| 0), None)
            }
            backend_req::SHMEM_UNMAP => {
                let (Some(shm), Some(m)) = (&self.shm, parse_mmap(body)) else {
                    return (errno(libc::EINVAL), None);
                };
                if m.shmid != 0 {
                    return (errno(libc::EINVAL), None);
                }
                (
                    shm.unmap(m.shm_offset, m.len).map_or_else(errno, |()| 0),
                    None,
                )
            }
            _ => (errno(libc::ENOSYS), None),
        }
    }

    fn lookup(&self, uuid: &Uuid) -> Result<OwnedFd, i32> {
        let source = lock(&self.objects).get(uuid).cloned();
        match source {
            None => Err(libc::ENOENT),
            Some(SharedObjectSource::External(fd)) => fd.try_clone().map_err(|_| libc::EIO),
            Some(SharedObjectSource::Backend) => {
                // Ask the exporter on its own connection, as QEMU does.
                let FrontendHandle(mut fe) = lock(&self.frontend).clone().ok_or(libc::ENOENT)?;
                fe.get_shared_object(&VhostUserSharedMsg { uuid: *uuid })
                    .map(OwnedFd::from)
                    .map_err(|_| libc::EIO)
            }
        }
    }
}

fn parse_uuid(body: &[u8]) -> Option<Uuid> {
    let bytes: [u8; 16] = body.get(..16)?.try_into().ok()?;
    Some(Uuid::from_bytes(bytes))
}

/// The UUID a shared-object request names.
fn shared_object_uuid(request: u32, body: &[u8]) -> Option<Uuid> {
    match request {
        backend_req::SHARED_OBJECT_ADD
        | backend_req::SHARED_OBJECT_REMOVE
        | backend_req::SHARED_OBJECT_LOOKUP => parse_uuid(body),
        _ => None,
    }
}

struct MmapMsg {
    shmid: u8,
    fd_offset: u64,
    shm_offset: u64,
    len: u64,
    writable: bool,
}

fn parse_mmap(body: &[u8]) -> Option<MmapMsg> {
    if body.len() < MMAP_MSG_SIZE {
        return None;
    }
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(o..o + 8)?.try_into().ok()?))
    };
    let flags = u64_at(32)?;
    if flags & !MMAP_FLAG_WRITABLE != 0 {
        return None;
    }
    Some(MmapMsg {
        shmid: *body.first()?,
        fd_offset: u64_at(8)?,
        shm_offset: u64_at(16)?,
        len: u64_at(24)?,
        writable: flags & MMAP_FLAG_WRITABLE != 0,
    })
}

/// The thread serving the channel.
#[derive(Debug)]
pub struct ChannelServer {
    sock: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl ChannelServer {
    /// Creates the socket pair; returns the server and the end to hand to
    /// the back-end with `SET_BACKEND_REQ_FD` (drop it after sending, so
    /// the server sees EOF when the back-end closes its copy).
    pub fn start(state: Arc<FrontendState>) -> io::Result<(ChannelServer, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let reader = ours.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vmm-backend-req".into())
            .spawn(move || serve(reader, &state))?;
        Ok((
            ChannelServer {
                sock: ours,
                thread: Some(thread),
            },
            theirs,
        ))
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receives `buf.len()` bytes, collecting any fds that arrive with them.
fn recv_exact_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; 8] = [-1; 8];
        // SAFETY: the iovec points at `rest`, which is writable for its
        // whole length and outlives the call.
        let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg just gave us these descriptors; nothing else
            // owns them.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(true)
}

fn serve(sock: UnixStream, state: &FrontendState) {
    loop {
        let mut hdr = [0u8; HDR_SIZE];
        let mut fds = Vec::new();
        match recv_exact_with_fds(&sock, &mut hdr, &mut fds) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::debug!("backend channel: {e}");
                return;
            }
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_BODY {
            log::warn!("backend channel: request {request} with a {size}-byte body; closing");
            return;
        }
        let mut body = vec![0u8; size];
        if (&sock).read_exact(&mut body).is_err() {
            return;
        }
        lock(&state.received).push(Received {
            request,
            flags,
            uuid: shared_object_uuid(request, &body),
            shm_range: match request {
                backend_req::SHMEM_MAP | backend_req::SHMEM_UNMAP => {
                    parse_mmap(&body).map(|m| (m.shm_offset, m.len))
                }
                _ => None,
            },
        });
        let (value, fd) = state.handle(request, &body, &fds);
        // LOOKUP has a reply payload of its own and is always answered;
        // the others are acked only when asked to (REPLY_ACK).
        let reply = request == backend_req::SHARED_OBJECT_LOOKUP || flags & FLAG_NEED_REPLY != 0;
        let fd_sent = fd.is_some();
        lock(&state.log).push(BackendMessage {
            request,
            flags,
            uuid: shared_object_uuid(request, &body),
            reply: reply.then_some(value),
            fd_sent: reply && fd_sent,
            fds_received: fds.len(),
        });
        if reply {
            let mut msg = Vec::with_capacity(HDR_SIZE + 8);
            msg.extend_from_slice(&request.to_le_bytes());
            msg.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
            msg.extend_from_slice(&8u32.to_le_bytes());
            msg.extend_from_slice(&value.to_le_bytes());
            let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
            if let Err(e) = sock.send_with_fds(&[&msg[..]], &raw) {
                log::debug!("backend channel reply: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn send(sock: &UnixStream, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        sock.send_with_fds(&[&msg[..]], fds).unwrap();
    }

    fn recv_reply(sock: &UnixStream) -> (u32, u32, u64, Vec<OwnedFd>) {
        let mut buf = [0u8; 20];
        let mut fds = Vec::new();
        assert!(recv_exact_with_fds(sock, &mut buf, &mut fds).unwrap());
        let w = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
        (
            w(0),
            w(4),
            u64::from_le_bytes(buf[12..20].try_into().unwrap()),
            fds,
        )
    }

    #[test]
    fn spec_lookup_add_remove_and_shmem_map() {
        let shm = Arc::new(ShmWindow::new(8 * 4096).unwrap());
        let state = Arc::new(FrontendState::new(Some(shm.clone())));
        let (_server, sock) = ChannelServer::start(state.clone()).unwrap();
        let uuid = Uuid::from_u128(0x1234);
        // LOOKUP of an unknown UUID: a failure, no fd, but a reply.
        send(
            &sock,
            backend_req::SHARED_OBJECT_LOOKUP,
            FLAG_VERSION,
            uuid.as_bytes(),
            &[],
        );
        let (req, flags, value, fds) = recv_reply(&sock);
        assert_eq!((req, flags & FLAG_REPLY != 0, fds.len()), (8, true, 0));
        assert_ne!(value, 0);
        // Another device publishes it: LOOKUP replies 0 with the fd.
        let f = super::super::shm::memfd_with("obj", &[7u8; 4096]).unwrap();
        state.publish_external(uuid, OwnedFd::from(f));
        send(
            &sock,
            backend_req::SHARED_OBJECT_LOOKUP,
            FLAG_VERSION | FLAG_NEED_REPLY,
            uuid.as_bytes(),
            &[],
        );
        let (_, _, value, fds) = recv_reply(&sock);
        assert_eq!((value, fds.len()), (0, 1));
        let mut first = [0u8; 1];
        let looked_up = std::fs::File::from(fds.into_iter().next().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&looked_up, &mut first, 0).unwrap();
        assert_eq!(first, [7]);
        // ADD/REMOVE with REPLY_ACK.
        let other = Uuid::from_u128(0x99);
        send(
            &sock,
            backend_req::SHARED_OBJECT_ADD,
            FLAG_VERSION | FLAG_NEED_REPLY,
            other.as_bytes(),
            &[],
        );
        assert_eq!(recv_reply(&sock).2, 0);
        assert_eq!(state.backend_objects(), vec![other]);
        send(
            &sock,
            backend_req::SHARED_OBJECT_REMOVE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            other.as_bytes(),
            &[],
        );
        assert_eq!(recv_reply(&sock).2, 0);
        assert!(state.backend_objects().is_empty());
        // SHMEM_MAP of a memfd page, writable, at offset 2 pages.
        let page = super::super::shm::memfd_with("page", &[0u8; 4096]).unwrap();
        let mut m = vec![0u8; MMAP_MSG_SIZE];
        m[16..24].copy_from_slice(&(2 * 4096u64).to_le_bytes());
        m[24..32].copy_from_slice(&4096u64.to_le_bytes());
        m[32..40].copy_from_slice(&MMAP_FLAG_WRITABLE.to_le_bytes());
        send(
            &sock,
            backend_req::SHMEM_MAP,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &m,
            &[page.as_raw_fd()],
        );
        assert_eq!(recv_reply(&sock).2, 0);
        shm.write(2 * 4096, b"abc").unwrap();
        let mut back = [0u8; 3];
        std::os::unix::fs::FileExt::read_exact_at(&page, &mut back, 0).unwrap();
        assert_eq!(&back, b"abc");
        // Unknown requests are refused with -ENOSYS when a reply is wanted.
        send(&sock, 3, FLAG_VERSION | FLAG_NEED_REPLY, &[], &[]);
        assert_eq!(recv_reply(&sock).2, (-i64::from(libc::ENOSYS)) as u64);
        send(
            &sock,
            backend_req::SHMEM_UNMAP,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &m,
            &[],
        );
        assert_eq!(recv_reply(&sock).2, 0);
        assert!(shm.mappings().is_empty());
        assert_eq!(state.log().len(), 7);
    }
}
