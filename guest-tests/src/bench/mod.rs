// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The measuring side of `dmabuf-bench`: requests written once into guest
//! RAM and sent again and again over the loopback VMM, round trips timed
//! one by one, batches kept in flight, and threads pinned for the pinned
//! figures. The same code drives the daemon and the null back-end
//! (`null.rs`), so whatever differs between the two is the back-end's.
#![allow(dead_code)]

pub mod null;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use dmabuf_guest_tests::driver::{BatchItem, Buffer, Desc, RawChain, Ticket};
use dmabuf_guest_tests::vmm::LoopbackVmm;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtio_dmabuf_protocol::{encode_request, encode_response, Reply, Request, Response, Status};

/// Where the tag sits in a request header and in a response header.
const TAG_OFFSET: u64 = 8;
/// How long a round trip may take before the run is called broken.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest sleep on a call eventfd before the used ring is looked at
/// anyway (a call that never came is then counted, not waited out).
const POLL_LIMIT: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Where a `u64` field lies in an encoding: the first byte that differs
/// between `make(A)` and `make(B)` for two values whose bytes all differ.
fn u64_offset(make: impl Fn(u64) -> Vec<u8>) -> usize {
    let (a, b) = (make(0x1111_1111_1111_1111), make(0x2222_2222_2222_2222));
    a.iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .expect("the field is in the encoding")
}

/// A `u64` of the reply of an earlier step that a later request carries
/// (an object, attachment or mapping handle).
#[derive(Debug, Clone, Copy)]
pub struct Patch {
    /// The step whose reply holds the value.
    pub from: usize,
    pub reply_offset: usize,
    pub request_offset: usize,
}

impl Patch {
    /// The handle of `reply(handle)` into the field of `request(handle)`.
    pub fn new(
        from: usize,
        reply: impl Fn(u64) -> Reply,
        request: impl Fn(u64) -> Request,
    ) -> Patch {
        Patch {
            from,
            reply_offset: u64_offset(|v| encode_response(0, &Ok(reply(v)))),
            request_offset: u64_offset(|v| encode_request(0, &request(v))),
        }
    }
}

/// A request encoded once into guest RAM, with its reply room. Sending it
/// again rewrites only its tag (and a patched handle) and makes the chain
/// available: the driver's side costs next to nothing.
#[derive(Debug, Clone, Copy)]
pub struct Prepared {
    req: Buffer,
    req_len: u32,
    reply: Buffer,
    reply_len: u32,
    patch: Option<Patch>,
}

impl Prepared {
    pub fn new(vm: &LoopbackVmm, request: &Request, reply_len: u32) -> Prepared {
        let bytes = encode_request(0, request);
        let pool = vm.driver().pool();
        let req = pool.alloc(bytes.len() as u64, 64).expect("guest RAM");
        vm.driver()
            .memory()
            .write(req.gpa, &bytes)
            .expect("guest RAM");
        let reply = pool.alloc(u64::from(reply_len), 64).expect("guest RAM");
        Prepared {
            req,
            req_len: bytes.len() as u32,
            reply,
            reply_len,
            patch: None,
        }
    }

    pub fn patched(mut self, patch: Patch) -> Prepared {
        self.patch = Some(patch);
        self
    }

    /// The chain with a fresh tag written in; returns (chain, tag).
    fn chain(&self, vm: &LoopbackVmm) -> (BatchItem, u64) {
        let tag = vm.driver().next_tag();
        vm.driver()
            .memory()
            .write(self.req.gpa + TAG_OFFSET, &tag.to_le_bytes())
            .expect("guest RAM");
        let chain = RawChain::new()
            .at(Desc {
                addr: self.req.gpa,
                len: self.req_len,
                write: false,
            })
            .at(Desc {
                addr: self.reply.gpa,
                len: self.reply_len,
                write: true,
            });
        (BatchItem::raw(chain), tag)
    }

    /// (status, tag) of the response header in the reply room.
    fn header(&self, vm: &LoopbackVmm) -> (u32, u64) {
        let mut r = [0u8; 16];
        vm.driver()
            .memory()
            .read(self.reply.gpa, &mut r)
            .expect("guest RAM");
        (
            u32::from_le_bytes(r[0..4].try_into().expect("4 bytes")),
            u64::from_le_bytes(r[8..16].try_into().expect("8 bytes")),
        )
    }

    /// Copies the handle `patch` names from `from`'s reply into this
    /// request.
    fn apply(&self, vm: &LoopbackVmm, from: &Prepared, patch: Patch) {
        let mut v = [0u8; 8];
        let memory = vm.driver().memory();
        memory
            .read(from.reply.gpa + patch.reply_offset as u64, &mut v)
            .expect("guest RAM");
        memory
            .write(self.req.gpa + patch.request_offset as u64, &v)
            .expect("guest RAM");
    }
}

/// Requests sent one after another, each waiting for the one before: one
/// operation of a round-trip line (`CREATE` then `RELEASE` of what it
/// made, say).
#[derive(Debug, Clone)]
pub struct Op {
    pub name: &'static str,
    pub steps: Vec<Prepared>,
}

impl Op {
    /// Runs the steps on `queue`; each answer must be OK with its tag.
    pub fn run(&self, vm: &LoopbackVmm, queue: u16) -> Result<(), String> {
        for (i, step) in self.steps.iter().enumerate() {
            if let Some(p) = step.patch {
                step.apply(vm, &self.steps[p.from], p);
            }
            let (item, tag) = step.chain(vm);
            let tickets = vm
                .driver()
                .submit_batch(queue, &[item])
                .map_err(|e| e.to_string())?;
            wait_all(vm, queue, &tickets)?;
            let (status, got) = step.header(vm);
            if status != Status::Ok as u32 || got != tag {
                return Err(format!(
                    "{} step {i}: status {status}, tag {got} for {tag}",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

/// Blocks until every ticket's chain is back on `queue`'s used ring,
/// sleeping on the call eventfd as a guest waits for its interrupt.
/// Returns how many chains came back without a call.
pub fn wait_all(vm: &LoopbackVmm, queue: u16, tickets: &[Ticket]) -> Result<u32, String> {
    let driver = vm.driver();
    let deadline = Instant::now() + TIMEOUT;
    let mut left: Vec<&Ticket> = tickets.iter().collect();
    let mut missed = 0;
    loop {
        let mut i = 0;
        while i < left.len() {
            match driver
                .try_complete_raw(left[i])
                .map_err(|e| e.to_string())?
            {
                Some(_) => {
                    left.swap_remove(i);
                }
                None => i += 1,
            }
        }
        if left.is_empty() {
            return Ok(missed);
        }
        if Instant::now() > deadline {
            return Err(format!("{} chains not back on queue {queue}", left.len()));
        }
        missed += u32::from(sleep_for_call(vm, queue)?);
    }
}

/// Blocks until the first of `tickets` (typed requests) is back on
/// `queue`'s used ring, sleeping on the call eventfd like [`wait_all`].
/// Returns its index and its response, the tag checked; the others stay
/// in flight. One thread per queue: a second waiter could take the call
/// meant for this one.
pub fn wait_any(
    vm: &LoopbackVmm,
    queue: u16,
    tickets: &[&Ticket],
) -> Result<(usize, Response), String> {
    let driver = vm.driver();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        for (i, ticket) in tickets.iter().enumerate() {
            if let Some(response) = driver.try_complete(ticket).map_err(|e| e.to_string())? {
                return Ok((i, response));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} chains not back on queue {queue}",
                tickets.len()
            ));
        }
        sleep_for_call(vm, queue)?;
    }
}

/// Sleeps on `queue`'s call eventfd, at most `POLL_LIMIT`, unless used
/// entries came meanwhile. Returns whether the sleep ended without a call.
fn sleep_for_call(vm: &LoopbackVmm, queue: u16) -> Result<bool, String> {
    let call = vm
        .notifier()
        .call_fd(queue)
        .ok_or_else(|| format!("no call eventfd for queue {queue}"))?;
    // Asking for the call (`used_event`) says whether entries came
    // meanwhile: then look again instead of sleeping.
    if vm
        .driver()
        .arm_interrupts(queue)
        .map_err(|e| e.to_string())?
    {
        return Ok(false);
    }
    // SAFETY: the queue's call eventfd, open as long as `vm`, which is
    // borrowed here.
    let fd = unsafe { BorrowedFd::borrow_raw(call.as_raw_fd()) };
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let missed = matches!(poll(&mut fds, Some(&POLL_LIMIT)), Ok(0));
    // Consumes the signal (EAGAIN when there was none).
    let _ = call.read();
    Ok(missed)
}

/// `n` requests in flight on `queue`, made available together with one
/// kick, and waited for together.
pub fn batch(vm: &LoopbackVmm, queue: u16, batch: &[Prepared]) -> Result<(), String> {
    let items: Vec<BatchItem> = batch.iter().map(|p| p.chain(vm).0).collect();
    let tickets = vm
        .driver()
        .submit_batch(queue, &items)
        .map_err(|e| e.to_string())?;
    wait_all(vm, queue, &tickets)?;
    for p in batch {
        let (status, _) = p.header(vm);
        if status != Status::Ok as u32 {
            return Err(format!("a batched request: status {status}"));
        }
    }
    Ok(())
}

/// Percentile `p` (0 to 100) of sorted `v`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed `cpu_set_t` is an empty set, which
    // `sched_getaffinity` fills; `CPU_ISSET` reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Sets the CPUs of every thread of process `pid` (0: this process).
pub fn set_affinity(pid: u32, cpus: &[usize]) -> Result<(), String> {
    let dir = if pid == 0 {
        "/proc/self/task".to_string()
    } else {
        format!("/proc/{pid}/task")
    };
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: a zeroed `cpu_set_t` is an empty set; `CPU_SET` writes
        // within it (each cpu is below `CPU_SETSIZE`, as `allowed_cpus`
        // returned it); `sched_setaffinity` only reads it. A thread that
        // ended meanwhile is ESRCH, which is fine.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set);
        }
    }
    Ok(())
}
