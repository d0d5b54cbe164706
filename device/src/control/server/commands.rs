// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control commands (contract section 11): one request line of a
//! [`Connection`] parsed, carried out on the model, and answered.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{fcntl_getfl, OFlags};
use serde_json::{json, Value};

use super::{Connection, Line};
use crate::control::records;
use crate::control::wire::{self, Request};
use crate::exporter::{ExportSpec, HostError, HostOpId};
use virtio_dmabuf_protocol::Status;

impl Connection {
    /// One request line.
    pub(super) fn handle(&mut self, line: Line) {
        let text = line.bytes.trim_ascii();
        if text.is_empty() {
            // Blank lines are no requests: no answer.
            return;
        }
        let request: Request = match serde_json::from_slice(text) {
            Ok(r) => r,
            Err(e) => {
                self.respond(wire::error(format!("malformed request: {e}")));
                return;
            }
        };
        let mut fds = line.fds;
        let response = match request {
            Request::Export {
                name,
                dynamic,
                read_only,
                guests,
            } => {
                if fds.len() != 1 {
                    wire::error(format!(
                        "export needs exactly one fd sent with its line (SCM_RIGHTS), got {}",
                        fds.len()
                    ))
                } else {
                    let spec = ExportSpec {
                        name,
                        dynamic,
                        read_only,
                        guests,
                    };
                    match fds.pop() {
                        Some(fd) => self.export(spec, fd),
                        None => wire::error("export needs an fd"),
                    }
                }
            }
            _ if !fds.is_empty() => {
                wire::error(format!("{} takes no fd; only export does", request.name()))
            }
            Request::List {} => {
                let objects = self.state.lock().list();
                wire::ok(records::list(&objects))
            }
            Request::Stats {} => {
                let stats = self.state.lock().stats();
                wire::ok(records::stats(&stats))
            }
            Request::Revoke { name } => {
                let mut ex = self.state.lock();
                let result = ex.host_revoke(&name, Instant::now());
                self.state.changed(&ex);
                drop(ex);
                match result {
                    Ok(()) => wire::ok(json!({ "name": name })),
                    Err(e) => wire::error(format!("revoke {name:?}: {e}")),
                }
            }
            Request::Evict { uuid, timeout_ms } => match self.evict(uuid, timeout_ms) {
                Some(response) => response,
                None => return,
            },
        };
        self.respond(response);
    }

    fn export(&mut self, spec: ExportSpec, fd: OwnedFd) -> Value {
        let name = spec.name.clone();
        // A writable export of a read-only fd would fail at the first write
        // or writable mapping; say so now.
        let read_only_fd =
            fcntl_getfl(fd.as_fd()).is_ok_and(|mode| mode & OFlags::RWMODE == OFlags::RDONLY);
        if read_only_fd && !spec.read_only {
            return wire::error(format!(
                "export {name:?}: the fd is open read-only; export it read-only (--read-only)"
            ));
        }
        let backing = match crate::provider::import_host_fd(fd) {
            Ok(b) => b,
            Err(e) => return wire::error(format!("export {name:?}: unusable buffer: {e}")),
        };
        let size = backing.size();
        let mut ex = self.state.lock();
        let result = ex.host_export(spec, backing);
        self.state.changed(&ex);
        drop(ex);
        match result {
            Ok(uuid) => {
                log::info!("exported {name:?} as {uuid} ({size} bytes)");
                wire::ok(json!({ "name": name, "uuid": uuid, "size": size }))
            }
            Err(e) => wire::error(format!("export {name:?}: {e}")),
        }
    }

    /// `None`: parked; the answer comes with [`Self::finish_evict`].
    fn evict(&mut self, uuid: uuid::Uuid, timeout_ms: u64) -> Option<Value> {
        let Some(id) = self.id else {
            return Some(wire::error("internal error: client without id"));
        };
        let op = {
            let mut s = self.shared.borrow_mut();
            let op = s.next_op;
            s.next_op += 1;
            op
        };
        let timeout = Duration::from_millis(timeout_ms);
        let mut ex = self.state.lock();
        let outcome = ex.host_evict(uuid, op, timeout, Instant::now());
        self.state.changed(&ex);
        drop(ex);
        match outcome {
            Some(result) => Some(evict_response(uuid, timeout_ms, result)),
            None => {
                self.waiting = Some((op, uuid, timeout_ms));
                self.shared.borrow_mut().waiting.insert(op, id);
                None
            }
        }
    }

    /// A parked eviction finished: answer, then go on with later lines.
    pub(super) fn finish_evict(&mut self, op: HostOpId, result: Result<(), HostError>) {
        let Some((waiting, uuid, timeout_ms)) = self.waiting else {
            return;
        };
        if waiting != op {
            return;
        }
        self.waiting = None;
        self.respond(evict_response(uuid, timeout_ms, result));
        self.flush();
        self.advance();
    }
}

/// The answer to `evict`, with the refusals of section 10 spelled out.
fn evict_response(uuid: uuid::Uuid, timeout_ms: u64, result: Result<(), HostError>) -> Value {
    match result {
        Ok(()) => {
            log::info!("evicted {uuid}");
            wire::ok(json!({ "uuid": uuid }))
        }
        Err(HostError::Pinned | HostError::Status(Status::Busy)) => wire::error(format!(
            "evict {uuid}: the object is pinned: an importer needs it where it is"
        )),
        Err(HostError::NotDynamic) => wire::error(format!(
            "evict {uuid}: the object is a static exporter: its backing never moves"
        )),
        Err(HostError::LockTimeout) => wire::error(format!(
            "evict {uuid}: the reservation lock was not free within {timeout_ms} ms"
        )),
        Err(e) => wire::error(format!("evict {uuid}: {e}")),
    }
}
