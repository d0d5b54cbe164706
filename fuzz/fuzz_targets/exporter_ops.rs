// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Operation sequences on the model (`Exporter`) with the real memfd
//! provider: guests' requests from two queues each, timers, vring stops,
//! reconnects, host exports, revokes and evictions. After every step:
//!
//! - every request is answered exactly once: at once, or later by one
//!   completion of its guest, tag and opcode (evictions likewise by one
//!   host completion);
//! - the model parks exactly the requests that are still unanswered.
//!
//! At the end every guest disconnects and every export is revoked: no
//! request is left unanswered, the model holds nothing (objects,
//! attachments, mappings, contexts, fences, parked requests, charged
//! bytes), and every fd it opened is closed again.
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost_device_dmabuf::exporter::{ExportSpec, Exporter, Limits, Origin};
use vhost_device_dmabuf::fuzzing::{memfd_exporter, model_counts, open_fds, yes_caps, YesFrontend};
use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
use vhost_device_dmabuf_fuzz::ops::{export_name, Op, GUESTS, QUEUES};
use vhost_device_dmabuf_fuzz::Cursor;
use virtio_dmabuf_protocol::{Opcode, Reply, Response};

/// A request waiting for its completion.
#[derive(Debug)]
struct Open {
    guest: usize,
    tag: u64,
    opcode: Opcode,
}

struct Run {
    ex: Exporter,
    now: Instant,
    next_token: u64,
    open: BTreeMap<u64, Open>,
    open_host: BTreeMap<u64, ()>,
    next_op: u64,
    uuids: Vec<[u8; 16]>,
    host_memory: MemfdProvider,
}

impl Run {
    fn note(&mut self, response: &Response) {
        let uuid = match response {
            Ok(Reply::Object(o)) => o.uuid,
            Ok(Reply::Uuid(u)) => *u,
            _ => return,
        };
        if !self.uuids.contains(&uuid) && self.uuids.len() < 64 {
            self.uuids.push(uuid);
        }
    }

    /// Completions must each answer one open request; host completions
    /// one open eviction.
    fn collect(&mut self) {
        for c in self.ex.take_completions() {
            let open = self
                .open
                .remove(&c.origin.token)
                .unwrap_or_else(|| panic!("a completion for no open request: {c:?}"));
            assert_eq!(
                (open.guest, open.tag, open.opcode),
                (c.guest, c.tag, c.opcode),
                "the completion answers another request"
            );
            self.note(&c.response);
        }
        for (op, _) in self.ex.take_host_completions() {
            assert!(
                self.open_host.remove(&op).is_some(),
                "host completion {op} for no open eviction"
            );
        }
    }

    fn check(&mut self) {
        self.collect();
        let counts = model_counts(&self.ex);
        assert_eq!(
            counts.pending,
            self.open.len() + self.open_host.len(),
            "parked requests and unanswered ones differ: {:?}",
            self.open
        );
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Submit {
                guest,
                queue,
                tag,
                req,
            } => {
                let guest = usize::from(guest) % GUESTS;
                let queue = QUEUES[usize::from(queue) % QUEUES.len()];
                let token = self.next_token;
                self.next_token += 1;
                let tag = u64::from(tag);
                let opcode = req.opcode();
                let origin = Origin { queue, token };
                match self.ex.submit(guest, origin, tag, req, self.now) {
                    Some(response) => self.note(&response),
                    None => {
                        self.open.insert(token, Open { guest, tag, opcode });
                    }
                }
            }
            Op::Tick { ms } => {
                self.now += Duration::from_millis(u64::from(ms) * 16);
                self.ex.tick(self.now);
            }
            Op::StopQueue { guest, queue } => {
                let guest = usize::from(guest) % GUESTS;
                let queue = QUEUES[usize::from(queue) % QUEUES.len()];
                self.ex.cancel_queue(guest, queue, self.now);
            }
            Op::Reconnect { guest } => {
                let guest = usize::from(guest) % GUESTS;
                self.ex.disconnect(guest, self.now);
                self.collect();
                self.ex.connect(guest, yes_caps(), Box::new(YesFrontend));
            }
            Op::Export {
                name,
                pages,
                dynamic,
                read_only,
                only_guest,
            } => {
                let size = u64::from(pages % 4 + 1) * 4096;
                let Ok(backing) = self.host_memory.allocate(size) else {
                    return;
                };
                let spec = ExportSpec {
                    name: export_name(name),
                    dynamic,
                    read_only,
                    guests: only_guest.map(|g| vec![usize::from(g) % (GUESTS + 1)]),
                };
                if let Ok(uuid) = self.ex.host_export(spec, backing) {
                    if self.uuids.len() < 64 {
                        self.uuids.push(*uuid.as_bytes());
                    }
                }
            }
            Op::Revoke { name } => {
                let _ = self.ex.host_revoke(&export_name(name), self.now);
            }
            Op::Evict { which, timeout_ms } => {
                let Some(uuid) = self
                    .uuids
                    .get(usize::from(which) % self.uuids.len().max(1))
                    .copied()
                else {
                    return;
                };
                let op = self.next_op;
                self.next_op += 1;
                let timeout = Duration::from_millis(u64::from(timeout_ms));
                let uuid = uuid::Uuid::from_bytes(uuid);
                if self.ex.host_evict(uuid, op, timeout, self.now).is_none() {
                    self.open_host.insert(op, ());
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let fds_before = open_fds().expect("/proc/self/fd");
    let limits = Limits {
        max_objects: 16,
        max_waiting: 8,
        max_pending_events: 16,
        ..Limits::default()
    };
    let mut run = Run {
        ex: memfd_exporter(GUESTS, limits),
        now: Instant::now(),
        next_token: 1,
        open: BTreeMap::new(),
        open_host: BTreeMap::new(),
        next_op: 1,
        uuids: Vec::new(),
        host_memory: MemfdProvider::new(1 << 20),
    };
    let mut c = Cursor::new(data);
    let mut steps = 0;
    while !c.is_empty() && steps < 256 {
        let op = Op::decode(&mut c, &run.uuids);
        run.step(op);
        run.check();
        steps += 1;
    }

    // Everybody leaves: nothing may be left behind.
    for g in 0..GUESTS {
        run.ex.disconnect(g, run.now);
    }
    for name in 0..8 {
        let _ = run.ex.host_revoke(&export_name(name), run.now);
    }
    run.now += Duration::from_secs(3600);
    run.ex.tick(run.now);
    run.check();
    assert!(run.open.is_empty(), "unanswered: {:?}", run.open);
    assert!(run.open_host.is_empty(), "evictions unanswered");
    let left = model_counts(&run.ex);
    assert!(
        left.is_empty(),
        "the model holds {left:?} after every guest left"
    );
    assert!(run.ex.next_deadline().is_none(), "a timer is left");
    assert_eq!(open_fds().expect("/proc/self/fd"), fds_before, "fds leaked");
});
