// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Speed of the daemon over its real vhost-user socket, each number next to
//! a baseline measured in the same run on the same machine.
//!
//! Run with `cargo bench -p vhost-device-dmabuf --bench daemon`.
//!
//! The daemon runs in this process and is driven the way a VMM drives it:
//! the `vhost` crate's `Frontend` over the daemon's socket, guest RAM in
//! memfds, split virtqueues (guest-tests' loopback VMM and driver, with the
//! daemon started as the daemon tests start it, `tests/common/daemon.rs`);
//! the driver sleeps on the call eventfd as a guest waits for its
//! interrupt.
//! The eventfd and socket baselines run pinned to one CPU (see [`pinned`]).
//! Each quantity is measured in [`ROUNDS`] rounds after one warm-up round
//! and the median is printed as
//! `name: value unit (baseline: value unit, ratio x.xx)`, where the ratio
//! is the operation's time over the baseline's time. `docs/benchmarks.md`
//! says what each line measures and what its baseline is. Nothing here
//! asserts on time.

#[path = "../tests/common/daemon.rs"]
mod daemon;

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemon::{lock_request, memfd, Guest, TestDaemon, Watchdog, TIMEOUT};
use dmabuf_guest_tests::driver::{BatchItem, Buffer, Desc, RawChain, Ticket};
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use vhost::VhostBackend;
use virtio_dmabuf_protocol::*;
use vmm_sys_util::eventfd::EventFd;

/// Measured rounds per quantity (after one warm-up round).
const ROUNDS: usize = 5;
/// Where the tag sits in an encoded request (checked in `main`).
const TAG_OFFSET: u64 = 8;
/// Room for any fixed-size reply.
const REPLY_ROOM: u32 = (RESP_HDR_SIZE + INFO_SIZE) as u32;
const MIB: usize = 1 << 20;
/// Requests per kick in the throughput line.
const BATCH: usize = 64;
/// How long a driver waits for a call before it looks at the used ring
/// anyway. A chain found back then came without its call: counted in
/// [`MISSED_CALLS`] and printed, since each one costs this long.
const POLL_LIMIT: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};
static MISSED_CALLS: AtomicU64 = AtomicU64::new(0);

/// Set when run as a test (`cargo test --benches`): one short round, to
/// see that it runs.
static SMOKE: AtomicBool = AtomicBool::new(false);

/// Microseconds per call of `f`, over `n` calls (a twentieth as a test).
fn per_op_us(n: u32, mut f: impl FnMut()) -> f64 {
    let n = if SMOKE.load(Ordering::Relaxed) {
        n.div_ceil(20)
    } else {
        n
    };
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A value with about three significant digits.
fn show(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// A request written once into guest RAM, with its reply room. Sending it
/// again only rewrites the tag and makes the chain available (descriptors
/// over these buffers, which the driver neither copies nor reads back), so
/// the driver's side costs next to nothing and guest RAM is not used up.
#[derive(Clone, Copy)]
struct Prepared {
    opcode: Opcode,
    req: Buffer,
    req_len: u32,
    reply: Buffer,
    reply_len: u32,
}

impl Prepared {
    fn new(vm: &LoopbackVmm, request: &Request, reply_len: u32) -> Prepared {
        let bytes = encode_request(0, request);
        let pool = vm.driver().pool();
        let req = pool.alloc(bytes.len() as u64, 64).expect("guest RAM");
        vm.driver()
            .memory()
            .write(req.gpa, &bytes)
            .expect("guest RAM");
        let reply = pool.alloc(u64::from(reply_len), 64).expect("guest RAM");
        Prepared {
            opcode: request.opcode(),
            req,
            req_len: bytes.len() as u32,
            reply,
            reply_len,
        }
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

    /// Makes the chain available on `queue` (with a kick if the device
    /// asks for one); returns (ticket, tag).
    fn send(&self, vm: &LoopbackVmm, queue: u16) -> (Ticket, u64) {
        let (item, tag) = self.chain(vm);
        let mut tickets = vm.driver().submit_batch(queue, &[item]).expect("the chain");
        (tickets.pop().expect("one ticket"), tag)
    }

    /// Blocks on the queue's call eventfd until the chain is back, as a
    /// driver waiting for its interrupt does; checks the response header
    /// says OK for this tag. Returns `used.len`.
    fn wait(&self, vm: &LoopbackVmm, queue: u16, (ticket, tag): (Ticket, u64)) -> u32 {
        let driver = vm.driver();
        let call = vm.notifier().call_fd(queue).expect("a call eventfd");
        let deadline = Instant::now() + TIMEOUT;
        let len = loop {
            if let Some(c) = driver.try_complete_raw(&ticket).expect("the used ring") {
                break c.used_len;
            }
            // Asking for the call (`used_event`, EVENT_IDX) says whether
            // entries came meanwhile: then look again instead of sleeping,
            // as a driver does before it sleeps.
            if driver.arm_interrupts(queue).expect("the used ring") {
                continue;
            }
            assert!(Instant::now() < deadline, "no answer to {:?}", self.opcode);
            // SAFETY: the queue's call eventfd, open as long as `vm`, which
            // is borrowed here.
            let fd = unsafe { BorrowedFd::borrow_raw(call.as_raw_fd()) };
            let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
            // A timeout with the chain back is a call that never came; an
            // interrupted poll just looks again.
            if matches!(poll(&mut fds, Some(&POLL_LIMIT)), Ok(0)) {
                if let Some(c) = driver.try_complete_raw(&ticket).expect("the used ring") {
                    MISSED_CALLS.fetch_add(1, Ordering::Relaxed);
                    break c.used_len;
                }
            }
            // Consumes the signal (EAGAIN when there was none).
            let _ = call.read();
        };
        assert!(len as usize >= RESP_HDR_SIZE, "used.len {len}");
        assert_eq!(
            self.response_header(vm),
            (Status::Ok as u32, tag),
            "{:?}",
            self.opcode
        );
        len
    }

    /// (status, tag) of the response header in the reply room.
    fn response_header(&self, vm: &LoopbackVmm) -> (u32, u64) {
        let mut r = [0u8; 16];
        vm.driver()
            .memory()
            .read(self.reply.gpa, &mut r)
            .expect("guest RAM");
        (
            u32::from_le_bytes(r[0..4].try_into().expect("4")),
            u64::from_le_bytes(r[8..16].try_into().expect("8")),
        )
    }

    fn call(&self, vm: &LoopbackVmm, queue: u16) {
        let sent = self.send(vm, queue);
        self.wait(vm, queue, sent);
    }

    /// Sends once and decodes the whole response (the check before
    /// measuring).
    fn check(&self, vm: &LoopbackVmm, queue: u16) -> Reply {
        let sent = self.send(vm, queue);
        let len = self.wait(vm, queue, sent);
        let mut bytes = vec![0u8; len as usize];
        vm.driver()
            .memory()
            .read(self.reply.gpa, &mut bytes)
            .expect("guest RAM");
        match decode_response(self.opcode, &bytes) {
            Ok((_, Ok(reply))) => reply,
            other => panic!("{:?}: {other:?}", self.opcode),
        }
    }
}

/// The requests of the virtqueue lines, prepared once.
struct Requests {
    get_info: Prepared,
    batch: Vec<Prepared>,
    to_host: Prepared,
    from_host: Prepared,
    lock_a: Prepared,
    lock_b: Prepared,
    unlock_a: Prepared,
    unlock_b: Prepared,
    map_shm: Prepared,
    unmap_shm: Prepared,
}

impl Requests {
    fn new(vm: &LoopbackVmm) -> Requests {
        let get_info = Prepared::new(vm, &Request::GetInfo, REPLY_ROOM);
        let batch = (0..BATCH)
            .map(|_| Prepared::new(vm, &Request::GetInfo, REPLY_ROOM))
            .collect();
        let object = vm.create(MIB as u64).object;
        let to_host = Prepared::new(
            vm,
            &Request::TransferToHost {
                object,
                offset: 0,
                data: vec![0xa5; MIB],
            },
            REPLY_ROOM,
        );
        let from_host = Prepared::new(
            vm,
            &Request::TransferFromHost {
                object,
                offset: 0,
                len: MIB as u64,
            },
            (RESP_HDR_SIZE + MIB) as u32,
        );
        let (a, b) = (vm.acquire(), vm.acquire());
        let lock_a = Prepared::new(vm, &lock_request(a, object), REPLY_ROOM);
        let lock_b = Prepared::new(vm, &lock_request(b, object), REPLY_ROOM);
        let unlock =
            |vm: &LoopbackVmm, ctx| Prepared::new(vm, &Request::Unlock { ctx, object }, REPLY_ROOM);
        let unlock_a = unlock(vm, a);
        let unlock_b = unlock(vm, b);
        let map_shm = Prepared::new(
            vm,
            &Request::MapShm {
                object,
                writable: true,
            },
            REPLY_ROOM,
        );
        let unmap_shm = Prepared::new(vm, &Request::UnmapShm { object }, REPLY_ROOM);
        Requests {
            get_info,
            batch,
            to_host,
            from_host,
            lock_a,
            lock_b,
            unlock_a,
            unlock_b,
            map_shm,
            unmap_shm,
        }
    }

    /// Every request once, each reply decoded and checked.
    fn check(&self, vm: &LoopbackVmm) {
        assert!(matches!(self.get_info.check(vm, 0), Reply::Info(_)));
        assert_eq!(self.to_host.check(vm, 0), Reply::Empty);
        match self.from_host.check(vm, 0) {
            Reply::Data(d) => assert!(d.len() == MIB && d.iter().all(|&b| b == 0xa5)),
            other => panic!("TRANSFER_FROM_HOST: {other:?}"),
        }
        assert_eq!(self.lock_a.check(vm, 0), Reply::Empty);
        assert_eq!(self.unlock_a.check(vm, 0), Reply::Empty);
        assert!(matches!(self.map_shm.check(vm, 0), Reply::Shm { .. }));
        assert_eq!(self.unmap_shm.check(vm, 0), Reply::Empty);
    }
}

/// One measured round of every quantity, in microseconds per operation.
#[derive(Default)]
struct Samples {
    eventfd: Vec<f64>,
    eventfd_apart: Vec<f64>,
    get_info: Vec<f64>,
    batched: Vec<f64>,
    memcpy: Vec<f64>,
    to_host: Vec<f64>,
    from_host: Vec<f64>,
    lock: Vec<f64>,
    unix: Vec<f64>,
    get_features: Vec<f64>,
    map_unmap: Vec<f64>,
    connect: Vec<f64>,
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed `cpu_set_t` is an empty set, which
    // `sched_getaffinity` fills; `CPU_ISSET` reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        assert_eq!(rc, 0, "sched_getaffinity");
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed `cpu_set_t` is an empty set; `CPU_SET` writes within
    // it (`cpu < CPU_SETSIZE`); `sched_setaffinity` only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

/// Runs `driver` on a thread pinned to `cpus.0` and `device` on one pinned
/// to `cpus.1`; returns what `driver` returns.
///
/// The baselines run both threads on one CPU, where a wake-up is a context
/// switch. Unpinned, the cost of a wake-up on a VM depends on where the
/// scheduler put the two threads and on the guest's halt-polling (from
/// about 6 to 65 us per round trip on the 2-core build VM): pinned, the
/// baselines are the floor, and stay put. The cross-CPU round trip is
/// printed as a line of its own.
fn pinned<T: Send>(
    cpus: (usize, usize),
    driver: impl FnOnce() -> T + Send,
    device: impl FnOnce() + Send,
) -> T {
    std::thread::scope(|scope| {
        let device = scope.spawn(move || {
            pin(cpus.1);
            device();
        });
        let out = scope
            .spawn(move || {
                pin(cpus.0);
                driver()
            })
            .join()
            .expect("baseline driver thread");
        device.join().expect("baseline device thread");
        out
    })
}

/// The notification floor: a bare eventfd ping-pong between two threads,
/// both blocked in `read` between turns (the driver kicks the device's
/// eventfd and sleeps on its call eventfd; the device sleeps on the kick
/// and answers with a call).
fn eventfd_ping_pong(n: u32, cpus: (usize, usize)) -> f64 {
    let kick = EventFd::new(0).expect("eventfd");
    let call = EventFd::new(0).expect("eventfd");
    let stop = AtomicBool::new(false);
    pinned(
        cpus,
        || {
            let us = per_op_us(n, || {
                kick.write(1).expect("kick");
                call.read().expect("call");
            });
            stop.store(true, Ordering::Release);
            kick.write(1).expect("kick");
            us
        },
        || loop {
            kick.read().expect("kick");
            if stop.load(Ordering::Acquire) {
                return;
            }
            call.write(1).expect("call");
        },
    )
}

/// A raw Unix-socket round trip of a vhost-user GET_FEATURES' sizes: a
/// 12-byte header one way, header and a u64 back, both ends blocking.
fn unix_ping_pong(n: u32, cpu: usize) -> f64 {
    let (mut ours, mut theirs) = UnixStream::pair().expect("socketpair");
    pinned(
        (cpu, cpu),
        move || {
            let mut reply = [0u8; 20];
            per_op_us(n, || {
                ours.write_all(&[0u8; 12]).expect("send");
                ours.read_exact(&mut reply).expect("receive");
            })
            // `ours` hangs up here, which ends the other side.
        },
        move || {
            let mut request = [0u8; 12];
            while theirs.read_exact(&mut request).is_ok() {
                if theirs.write_all(&[0u8; 20]).is_err() {
                    return;
                }
            }
        },
    )
}

/// A shared, writable mapping of a memfd, faulted in.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    _file: File,
}

impl Mapping {
    fn new(name: &str, len: usize) -> Mapping {
        let file = memfd(name, len as u64);
        // SAFETY: a fresh mapping chosen by the kernel, of a memfd `len`
        // bytes long; it overlaps nothing and is unmapped only on drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }
        .expect("mmap")
        .cast::<u8>();
        // SAFETY: `ptr` is a writable mapping of `len` bytes owned here.
        unsafe { std::ptr::write_bytes(ptr, 0x5a, len) };
        Mapping {
            ptr,
            len,
            _file: file,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

/// The copy floor: a plain memcpy of 1 MiB between two memfd mappings.
fn memcpy_mib(from: &Mapping, to: &Mapping, n: u32) -> f64 {
    per_op_us(n, || {
        // SAFETY: two distinct mappings of `MIB` bytes each, owned by the
        // caller for the whole call.
        unsafe { std::ptr::copy_nonoverlapping(black_box(from.ptr), black_box(to.ptr), MIB) };
        black_box(to.ptr);
    })
}

/// What the baselines need besides the connected VM.
struct Setup {
    requests: Requests,
    /// Source and destination of the copy floor.
    maps: (Mapping, Mapping),
    /// The CPU the baselines run on, and a second one if there is one.
    cpus: (usize, Option<usize>),
}

/// One round of every quantity measured on the connected `vm`.
fn steady_round(vm: &mut LoopbackVmm, setup: &Setup, s: &mut Samples) {
    let (r, maps, (cpu, other_cpu)) = (&setup.requests, &setup.maps, setup.cpus);
    s.eventfd.push(eventfd_ping_pong(10_000, (cpu, cpu)));
    if let Some(other) = other_cpu {
        s.eventfd_apart.push(eventfd_ping_pong(1000, (cpu, other)));
    }
    s.get_info.push(per_op_us(5000, || r.get_info.call(vm, 0)));
    s.batched.push(
        per_op_us(100, || {
            // One avail index update and at most one kick for the batch.
            let (items, tags): (Vec<_>, Vec<_>) = r.batch.iter().map(|p| p.chain(vm)).unzip();
            let tickets = vm.driver().submit_batch(0, &items).expect("the batch");
            for ((p, ticket), tag) in r.batch.iter().zip(tickets).zip(tags) {
                p.wait(vm, 0, (ticket, tag));
            }
        }) / BATCH as f64,
    );

    s.memcpy.push(memcpy_mib(&maps.0, &maps.1, 1000));
    s.to_host.push(per_op_us(200, || r.to_host.call(vm, 0)));
    s.from_host.push(per_op_us(200, || r.from_host.call(vm, 0)));

    // Lock handover between two queues: lock, park the second context's
    // LOCK on the other queue, unlock (which completes the parked one),
    // unlock.
    s.lock.push(per_op_us(500, || {
        r.lock_a.call(vm, 0);
        let parked = r.lock_b.send(vm, 2);
        r.unlock_a.call(vm, 0);
        r.lock_b.wait(vm, 2, parked);
        r.unlock_b.call(vm, 0);
    }));

    s.unix.push(unix_ping_pong(10_000, cpu));
    s.get_features.push(per_op_us(2000, || {
        vm.frontend().get_features().expect("GET_FEATURES");
    }));

    // Each MAP_SHM and UNMAP_SHM is one acked message on the back-end
    // channel besides the virtqueue round trip.
    s.map_unmap.push(per_op_us(500, || {
        r.map_shm.call(vm, 0);
        r.unmap_shm.call(vm, 0);
    }));
}

/// A whole connection: negotiation, memory table, rings, one GET_INFO,
/// hang-up.
fn connect_round(d: &TestDaemon, s: &mut Samples) {
    s.connect.push(per_op_us(40, || {
        let vm = d.vm(0, VmmOptions::default());
        let get_info = Prepared::new(&vm, &Request::GetInfo, REPLY_ROOM);
        get_info.call(&vm, 0);
    }));
}

fn line(name: &str, value: &[f64], baseline: f64, unit: &str) {
    let v = median(value.to_vec());
    println!(
        "{name}: {} {unit} (baseline: {} {unit}, ratio {:.2})",
        show(v),
        show(baseline),
        v / baseline
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` (or
    // `--all-targets`) runs this too and only wants to see it work.
    let smoke = std::env::args().all(|a| a != "--bench");
    SMOKE.store(smoke, Ordering::Relaxed);
    let rounds = if smoke { 1 } else { ROUNDS };
    let _watchdog = Watchdog::arm("the daemon benchmark", Duration::from_secs(300));

    let tag = 0x0102_0304_0506_0708;
    let at = TAG_OFFSET as usize;
    assert_eq!(
        encode_request(tag, &Request::GetInfo)[at..at + 8],
        tag.to_le_bytes(),
        "the tag moved in the request header"
    );

    let d = TestDaemon::start(|c| c.request_queues = 2);
    let mut vm = d.vm(
        0,
        VmmOptions {
            ram: vec![(0, 64 << 20)],
            queue_size: 1024,
            ..VmmOptions::default()
        },
    );
    assert_eq!(vm.negotiated().num_queues, 3, "two request queues");
    let requests = Requests::new(&vm);
    requests.check(&vm);
    let cpus = allowed_cpus();
    let setup = Setup {
        requests,
        maps: (
            Mapping::new("bench-src", MIB),
            Mapping::new("bench-dst", MIB),
        ),
        cpus: (cpus[0], cpus.get(1).copied()),
    };

    let started = Instant::now();
    let mut s = Samples::default();
    // The warm-up round is measured and thrown away.
    if !smoke {
        steady_round(&mut vm, &setup, &mut Samples::default());
    }
    for _ in 0..rounds {
        steady_round(&mut vm, &setup, &mut s);
    }
    drop(vm);
    if !smoke {
        connect_round(&d, &mut Samples::default());
    }
    for _ in 0..rounds {
        connect_round(&d, &mut s);
    }
    d.stop();

    if smoke {
        println!("smoke run (not `cargo bench`): the numbers below mean nothing");
    }
    println!(
        "daemon benchmark: median of {rounds} rounds, {} CPUs, {:.1} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    let eventfd = median(s.eventfd.clone());
    let get_info = median(s.get_info.clone());
    let memcpy = median(s.memcpy.clone());
    if !s.eventfd_apart.is_empty() {
        line(
            "eventfd ping-pong across two CPUs (vs the same on one CPU)",
            &s.eventfd_apart,
            eventfd,
            "us",
        );
    }
    line(
        "GET_INFO round trip (vs eventfd ping-pong on one CPU)",
        &s.get_info,
        eventfd,
        "us",
    );
    line(
        "GET_INFO 64 per kick, per request (vs eventfd ping-pong on one CPU / 64)",
        &s.batched,
        eventfd / BATCH as f64,
        "us",
    );
    line(
        "TRANSFER_TO_HOST 1 MiB (vs memcpy 1 MiB memfd to memfd)",
        &s.to_host,
        memcpy,
        "us",
    );
    line(
        "TRANSFER_FROM_HOST 1 MiB (vs memcpy 1 MiB memfd to memfd)",
        &s.from_host,
        memcpy,
        "us",
    );
    line(
        "LOCK handover cycle (vs 2 GET_INFO round trips)",
        &s.lock,
        2.0 * get_info,
        "us",
    );
    line(
        "MAP_SHM + UNMAP_SHM (vs GET_FEATURES round trip)",
        &s.map_unmap,
        median(s.get_features.clone()),
        "us",
    );
    line(
        "GET_FEATURES through the relay (vs Unix-socket ping-pong 12/20 bytes on one CPU)",
        &s.get_features,
        median(s.unix.clone()),
        "us",
    );
    println!(
        "connect + setup + GET_INFO + disconnect: {} us",
        show(median(s.connect))
    );
    let missed = MISSED_CALLS.load(Ordering::Relaxed);
    if missed > 0 {
        println!(
            "note: {missed} chains came back without a call within {} ms",
            POLL_LIMIT.tv_nsec / 1_000_000
        );
    }
}
