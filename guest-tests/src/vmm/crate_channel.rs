// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The back-end request channel served by the `vhost` crate's own
//! `FrontendReqHandler` instead of the VMM's [`ChannelServer`]: what a VMM
//! built on that handler sees (`SHMEM_MAP`, `SHMEM_UNMAP`, and the
//! shared-object `ADD`/`REMOVE`; its `LOOKUP` does not follow the
//! specification, so only the daemon's other requests are meaningful
//! here). Nothing is mapped: the handler records what it was asked.
//!
//! [`ChannelServer`]: super::channel::ChannelServer

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use uuid::Uuid;
use vhost::vhost_user::message::{VhostUserMMap, VhostUserSharedMsg};
use vhost::vhost_user::{
    Error as VhostUserError, FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandlerMut,
};

/// One `SHMEM_MAP` as the handler received it.
#[derive(Debug)]
pub struct Mapped {
    pub shmid: u8,
    pub fd_offset: u64,
    pub shm_offset: u64,
    pub len: u64,
    pub flags: u64,
    /// A duplicate of the fd that came with the request.
    pub file: File,
}

/// What the handler was asked, in order per kind.
#[derive(Debug, Default)]
pub struct CrateLog {
    pub maps: Vec<Mapped>,
    /// `(shm_offset, len)` of every `SHMEM_UNMAP`.
    pub unmaps: Vec<(u64, u64)>,
    pub added: Vec<Uuid>,
    pub removed: Vec<Uuid>,
}

fn lock(log: &Mutex<CrateLog>) -> MutexGuard<'_, CrateLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Recorder {
    log: Arc<Mutex<CrateLog>>,
}

/// Duplicates an fd the handler lends for the duration of one call.
fn dup_lent(fd: &dyn AsRawFd) -> io::Result<File> {
    // SAFETY: the handler passes an fd that stays open for the whole call;
    // it is only borrowed here to be duplicated.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    Ok(File::from(borrowed.try_clone_to_owned()?))
}

impl VhostUserFrontendReqHandlerMut for Recorder {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        let r = *req;
        let file = dup_lent(fd)?;
        lock(&self.log).maps.push(Mapped {
            shmid: r.shmid,
            fd_offset: r.fd_offset,
            shm_offset: r.shm_offset,
            len: r.len,
            flags: r.flags,
            file,
        });
        Ok(0)
    }

    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let r = *req;
        lock(&self.log).unmaps.push((r.shm_offset, r.len));
        Ok(0)
    }

    fn shared_object_add(&mut self, msg: &VhostUserSharedMsg) -> HandlerResult<u64> {
        lock(&self.log).added.push(msg.uuid);
        Ok(0)
    }

    fn shared_object_remove(&mut self, msg: &VhostUserSharedMsg) -> HandlerResult<u64> {
        lock(&self.log).removed.push(msg.uuid);
        Ok(0)
    }
}

/// The `vhost` crate's handler on a thread of its own.
#[derive(Debug)]
pub struct CrateChannel {
    log: Arc<Mutex<CrateLog>>,
    /// A duplicate of the handler's socket, to hang it up.
    rx: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl CrateChannel {
    /// Starts the handler; returns it and the fd to hand to the back-end
    /// with `SET_BACKEND_REQ_FD`. `reply_ack`: answer requests that ask.
    pub fn start(reply_ack: bool) -> io::Result<(CrateChannel, OwnedFd)> {
        let log = Arc::new(Mutex::new(CrateLog::default()));
        let recorder = Arc::new(Mutex::new(Recorder { log: log.clone() }));
        let mut server = FrontendReqHandler::new(recorder).map_err(io::Error::other)?;
        server.set_reply_ack_flag(reply_ack);
        // SAFETY: both fds belong to `server`, which is alive here; they
        // are only borrowed to be duplicated.
        let (rx, tx) = unsafe {
            (
                BorrowedFd::borrow_raw(server.as_raw_fd()).try_clone_to_owned()?,
                BorrowedFd::borrow_raw(server.get_tx_raw_fd()).try_clone_to_owned()?,
            )
        };
        let thread = std::thread::Builder::new()
            .name("vmm-crate-backend-req".into())
            .spawn(move || loop {
                match server.handle_request() {
                    Ok(_) => {}
                    Err(
                        VhostUserError::Disconnected
                        | VhostUserError::PartialMessage
                        | VhostUserError::SocketBroken(_),
                    ) => break,
                    Err(e) => log::warn!("vhost crate front-end handler: {e}"),
                }
            })?;
        Ok((
            CrateChannel {
                log,
                rx,
                thread: Some(thread),
            },
            tx,
        ))
    }

    /// What the handler was asked so far.
    pub fn log(&self) -> MutexGuard<'_, CrateLog> {
        lock(&self.log)
    }
}

impl Drop for CrateChannel {
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.rx, rustix::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
