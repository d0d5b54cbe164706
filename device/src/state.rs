// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The state every thread of the daemon shares: the exporter behind one
//! lock, and the wake-ups that tell a guest's worker (or the control plane)
//! that something for it changed elsewhere.
//!
//! A guest's vring worker submits requests and drains its own completions
//! and events. Anything else that changes the model (another guest's
//! request, a host command, a timer) may complete that guest's parked
//! requests or queue its events, so after every change the changer calls
//! [`DeviceState::changed`], which writes the eventfds of the guests that
//! have something to deliver and nudges the timer thread when it must
//! look again (an earlier deadline, a new host fence watch).
//!
//! The timer thread is the daemon's one place that waits for time and for
//! the host kernel: it polls its wake-up eventfd and the host fence
//! watches of parked requests (`exporter/host_fences.rs`) with the next
//! deadline as the timeout, so a host fence signalling re-runs the request
//! that waited for it, and nothing ever blocks on a fence.
//!
//! # Locking
//!
//! This is the daemon's one statement of its locking rules; comments
//! elsewhere point here. Every lock is a `std::sync::Mutex` (but for the
//! vrings' own, which come with the ring type). A thread takes them only
//! in this order, each at most once:
//!
//! 1. **the table** — `DmabufBackend::chains` (`backend/mod.rs`): one
//!    connection's chains in flight. Rings are written only with it held;
//!    a vring stop and a device reset take it first (`backend/requests`).
//! 2. **the model** — `DeviceState::exporter` (this file, [`DeviceState::lock`]):
//!    the whole exporter, shared by every guest's worker, every
//!    connection's front-end thread, the control plane and the timer
//!    thread. Taken alone, or with the table held.
//! 3. **leaves** — never held while another lock is taken; any of them may
//!    be taken with the table and/or the model held:
//!    - a vring's own lock (`VringRwLock`: `get_mut`, `add_used`,
//!      `enable_notification`, ...): the avail and used rings. Taken with
//!      the table held, never with the model held;
//!    - `DmabufBackend::vrings`: the vrings as the first event showed them
//!      (cloned out, then released: never held across a vring's lock);
//!    - `DmabufBackend::regions`: the memory table as last seen (read by
//!      `caps`, which runs with the model held);
//!    - `DmabufBackend::exit_consumers`: the workers' exit eventfds;
//!    - `Tally::answers` (`backend/requests`): the statuses counted for the
//!      disconnect summary;
//!    - `Link::channel`, `Link::memory`, `Link::lookups`
//!      (`Link` in `backend/`): the back-end channel, the guest
//!      memory and the stashed `SHARED_OBJECT_LOOKUP` results the model's
//!      `Frontend` hooks use (with the model held);
//!    - the channel's queue, `channel::Inner::state` with its condvar
//!      (`backend/channel.rs`): messages posted by the `Frontend` hooks
//!      under the model, their outcomes; a worker waits on the condvar
//!      holding no other lock;
//!    - `Channel::thread` (`backend/channel.rs`): the channel thread's
//!      handle, taken out and joined with no lock held;
//!    - `ConnectionInfo::channel_socket` (`backend/relay.rs`): the
//!      back-end channel socket the relay saw;
//!    - `Shared::connections` (`backend/listener.rs`, taken by the
//!      listener threads and `daemon.rs`): each guest's live connection's
//!      shutdown handle (the handle's `shutdown` is called with it held,
//!      and takes none of ours);
//!    - `SyncRecord::inner` (`provider/sync.rs`): the record of emulated
//!      syncs, pushed to by memfd buffers from inside the model;
//!    - a guest's slab pool (`provider/slab.rs`): taken by `CREATE`, and
//!      by a slab extent's drop, with the model held.
//!
//! Nothing waits for the front-end with any lock held: the model's
//! `Frontend` hooks only queue a message for the channel thread, and the
//! worker that submitted the request waits for its outcome after releasing
//! every lock (`docs/daemon.md`). The control plane's event loop is one
//! thread (its state is a `RefCell`) and takes only the model.
//!
//! Debug builds check the order of the table, the model and the leaves
//! that go through the back-end's lock helpers: [`lock_order`] keeps a
//! per-thread stack of what is held and panics when a lock is taken after
//! one of the same or a later rank.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::exporter::{Exporter, GuestId};

/// Shared by the vring workers of every guest, the control plane and the
/// timer thread.
#[derive(Debug)]
pub struct DeviceState {
    exporter: Mutex<Exporter>,
    /// One per guest: readable when the guest has completions or events.
    guest_wake: Vec<EventFd>,
    /// Readable when host operations completed (the control plane polls it).
    control_wake: EventFd,
    /// The timer thread polls this (and the host fence watches) until the
    /// next deadline: written when a change moved the deadline earlier or
    /// added a watch (see [`DeviceState::changed`]).
    timer_wake: EventFd,
    timer_stop: AtomicBool,
    /// What the timer thread last saw, stored with the model held: the
    /// deadline it sleeps until, in nanoseconds since `origin` (`u64::MAX`:
    /// none), and the model's watch epoch.
    timer_deadline: AtomicU64,
    timer_epoch: AtomicU64,
    origin: Instant,
}

/// The longest the timer thread sleeps with nothing due.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

impl DeviceState {
    pub fn new(exporter: Exporter) -> std::io::Result<Arc<DeviceState>> {
        let guests = exporter.num_guests();
        let guest_wake = (0..guests)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Arc::new(DeviceState {
            exporter: Mutex::new(exporter),
            guest_wake,
            control_wake: EventFd::new(EFD_NONBLOCK)?,
            timer_wake: EventFd::new(EFD_NONBLOCK)?,
            timer_stop: AtomicBool::new(false),
            timer_deadline: AtomicU64::new(u64::MAX),
            timer_epoch: AtomicU64::new(0),
            origin: Instant::now(),
        }))
    }

    /// The model. A panic while it was held cannot be recovered from in a
    /// meaningful way, but serving the other guests beats aborting them all.
    /// See the module's `# Locking` for what may be held around it.
    pub fn lock(&self) -> lock_order::Ordered<'_, Exporter> {
        lock_order::Ordered::new(
            self.exporter.lock().unwrap_or_else(PoisonError::into_inner),
            lock_order::Rank::Model,
        )
    }

    /// The eventfd a guest's worker listens on.
    pub fn guest_wake(&self, guest: GuestId) -> Option<&EventFd> {
        self.guest_wake.get(guest)
    }

    /// The eventfd the control plane listens on.
    pub fn control_wake(&self) -> &EventFd {
        &self.control_wake
    }

    /// Call after any change to the model, with the model held: wakes each
    /// guest that has something to deliver, the control plane when a host
    /// operation finished, and the timer thread when it must look again
    /// (a deadline earlier than the one it sleeps until, or a new host fence
    /// watch). Most requests change none of these and write no eventfd.
    pub fn changed(&self, exporter: &Exporter) {
        self.notify(exporter);
        if self.timer_must_look(exporter) {
            // A full counter still wakes the reader; nothing is lost.
            let _ = self.timer_wake.write(1);
        }
    }

    /// Wakes the guests with something to deliver and, when a host
    /// operation finished, the control plane.
    fn notify(&self, exporter: &Exporter) {
        for (guest, fd) in self.guest_wake.iter().enumerate() {
            if exporter.has_completions(guest) || exporter.has_events(guest) {
                let _ = fd.write(1);
            }
        }
        if exporter.has_host_completions() {
            let _ = self.control_wake.write(1);
        }
    }

    /// True when the model wants the timer thread earlier than it sleeps,
    /// or has a watch it did not see. Both sides run with the model held,
    /// so what the timer thread stored is what it waits for.
    fn timer_must_look(&self, exporter: &Exporter) -> bool {
        exporter.watch_epoch() != self.timer_epoch.load(Ordering::Relaxed)
            || exporter
                .next_deadline()
                .is_some_and(|d| self.since_origin(d) < self.timer_deadline.load(Ordering::Relaxed))
    }

    /// `at` in nanoseconds since the state was made (0 before it).
    fn since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Starts the thread that fires the model's timers (fence timeouts,
    /// WAIT timeouts, eviction lock timeouts) and watches the host fences
    /// parked requests wait for.
    pub fn spawn_timer(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let state = Arc::clone(self);
        std::thread::Builder::new()
            .name("dmabuf-timer".into())
            .spawn(move || state.timer_loop())
    }

    /// Stops the timer thread.
    pub fn stop_timer(&self) {
        self.timer_stop.store(true, Ordering::SeqCst);
        let _ = self.timer_wake.write(1);
    }

    fn timer_loop(&self) {
        loop {
            // Empty the wake-up before looking at the stop flag and the
            // model: a change made after this (a stop, a new deadline, a
            // new watch) ends the poll below at once, however the threads
            // interleave. Emptying it after either would lose a wake-up
            // that landed in between (a stop then waited out IDLE_WAIT).
            let _ = self.timer_wake.read();
            if self.timer_stop.load(Ordering::SeqCst) {
                return;
            }
            let (deadline, watches) = {
                let mut ex = self.lock();
                let now = Instant::now();
                if ex.next_deadline().is_some_and(|d| d <= now) {
                    ex.tick(now);
                    self.notify(&ex);
                }
                let deadline = ex.next_deadline();
                let until = deadline.map_or(u64::MAX, |d| self.since_origin(d));
                self.timer_deadline.store(until, Ordering::Relaxed);
                self.timer_epoch.store(ex.watch_epoch(), Ordering::Relaxed);
                (deadline, ex.host_watches())
            };
            let wait = deadline.map_or(IDLE_WAIT, |d| {
                d.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
            });
            let timeout = Timespec {
                tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut fds = Vec::with_capacity(watches.len() + 1);
            // SAFETY: the eventfd is owned by `self`, which outlives `fds`.
            let wake = unsafe { BorrowedFd::borrow_raw(self.timer_wake.as_raw_fd()) };
            fds.push(PollFd::from_borrowed_fd(wake, PollFlags::IN));
            fds.extend(
                watches
                    .iter()
                    .map(|(_, fd, events)| PollFd::from_borrowed_fd(fd.as_fd(), *events)),
            );
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // Cannot happen with valid fds; do not spin on it.
                    log::error!("timer thread: poll: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let ready: Vec<u64> = fds
                .iter()
                .skip(1)
                .zip(&watches)
                .filter(|(fd, _)| !fd.revents().is_empty())
                .map(|(_, (id, _, _))| *id)
                .collect();
            drop(fds);
            if !ready.is_empty() {
                let mut ex = self.lock();
                ex.host_watches_ready(&ready, Instant::now());
                self.notify(&ex);
            }
        }
    }
}

/// The debug-build check of the order in the module's `# Locking`: each
/// thread keeps a stack of the ranks it holds, and taking a lock of a rank
/// not above the last one held panics. Release builds keep nothing.
pub mod lock_order {
    use std::ops::{Deref, DerefMut};
    use std::sync::MutexGuard;

    /// A lock's place in the order; later ranks are taken after earlier
    /// ones, never before.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Rank {
        /// `DmabufBackend::chains`.
        Table,
        /// `DeviceState::exporter`.
        Model,
        /// Any leaf: nothing is taken while one is held.
        Leaf,
    }

    #[cfg(debug_assertions)]
    thread_local! {
        static HELD: std::cell::RefCell<Vec<Rank>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// One rank on this thread's stack, popped when dropped.
    #[derive(Debug)]
    pub struct Held {
        #[cfg(debug_assertions)]
        rank: Rank,
    }

    impl Held {
        /// Records `rank` as held; in debug builds, panics when the last
        /// rank held is the same or later.
        pub fn enter(rank: Rank) -> Held {
            #[cfg(debug_assertions)]
            HELD.with(|held| {
                let mut held = held.borrow_mut();
                if let Some(last) = held.last() {
                    assert!(
                        *last < rank,
                        "lock order: {rank:?} taken while {last:?} is held (see state.rs, # Locking)"
                    );
                }
                held.push(rank);
            });
            #[cfg(not(debug_assertions))]
            let _ = rank;
            Held {
                #[cfg(debug_assertions)]
                rank,
            }
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            #[cfg(debug_assertions)]
            HELD.with(|held| {
                let mut held = held.borrow_mut();
                if let Some(i) = held.iter().rposition(|r| *r == self.rank) {
                    held.remove(i);
                }
            });
        }
    }

    /// A mutex guard with its rank: derefs to the guarded value; the rank
    /// is released after the mutex.
    #[derive(Debug)]
    pub struct Ordered<'a, T> {
        guard: MutexGuard<'a, T>,
        _held: Held,
    }

    impl<'a, T> Ordered<'a, T> {
        /// `guard`, just taken, of a lock of `rank`. The rank is checked
        /// after the mutex was taken: a wrong order that would deadlock
        /// still deadlocks, but any run that takes the locks in a wrong
        /// order without deadlocking panics in a debug build.
        pub fn new(guard: MutexGuard<'a, T>, rank: Rank) -> Self {
            Ordered {
                _held: Held::enter(rank),
                guard,
            }
        }
    }

    impl<T> Deref for Ordered<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.guard
        }
    }

    impl<T> DerefMut for Ordered<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.guard
        }
    }

    #[cfg(test)]
    mod tests {
        use std::sync::Mutex;

        use super::{Ordered, Rank};

        #[test]
        fn the_order_is_accepted() {
            let (table, model, leaf) = (Mutex::new(0), Mutex::new(1), Mutex::new(2));
            let t = Ordered::new(table.lock().expect("table"), Rank::Table);
            let m = Ordered::new(model.lock().expect("model"), Rank::Model);
            let l = Ordered::new(leaf.lock().expect("leaf"), Rank::Leaf);
            assert_eq!(*t + *m + *l, 3);
            drop(l);
            drop(m);
            let l = Ordered::new(leaf.lock().expect("leaf"), Rank::Leaf);
            assert_eq!(*l, 2);
        }

        #[test]
        #[cfg_attr(debug_assertions, should_panic(expected = "lock order"))]
        fn the_table_after_the_model_panics_in_debug_builds() {
            let (table, model) = (Mutex::new(0), Mutex::new(1));
            let _m = Ordered::new(model.lock().expect("model"), Rank::Model);
            let _t = Ordered::new(table.lock().expect("table"), Rank::Table);
        }

        #[test]
        #[cfg_attr(debug_assertions, should_panic(expected = "lock order"))]
        fn a_lock_under_a_leaf_panics_in_debug_builds() {
            let (a, b) = (Mutex::new(0), Mutex::new(1));
            let _a = Ordered::new(a.lock().expect("a"), Rank::Leaf);
            let _b = Ordered::new(b.lock().expect("b"), Rank::Leaf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_dmabuf_protocol::{FenceUsage, Reply, Request, Status};

    use super::DeviceState;
    use crate::exporter::{Exporter, ExporterConfig, GuestCaps, NoFrontend, Origin};
    use crate::provider::MemfdProvider;

    fn submit(state: &DeviceState, token: u64, req: Request) -> Option<Result<Reply, Status>> {
        let mut ex = state.lock();
        let r = ex.submit(0, Origin { queue: 0, token }, token, req, Instant::now());
        state.changed(&ex);
        r
    }

    /// Every new deadline reaches the timer thread, however the threads
    /// interleave: many short WAITs each time out promptly.
    #[test]
    fn timer_thread_never_misses_a_new_deadline() {
        // The fence the WAITs wait for must outlive the loop however slow
        // the machine (an emulated guest took 11 s for it): only the WAITs'
        // own timeouts may end them.
        let config = ExporterConfig {
            fence_timeout: Duration::from_secs(3600),
            ..ExporterConfig::default()
        };
        let mut ex = Exporter::new(config, Box::new(MemfdProvider::new(1 << 20)), 1);
        ex.connect(0, GuestCaps::default(), Box::new(NoFrontend));
        let state = DeviceState::new(ex).expect("state");
        let timer = state.spawn_timer().expect("timer");
        let page = crate::exporter::page_size();
        let object = match submit(
            &state,
            1,
            Request::Create {
                size: page,
                dynamic: false,
                cache_mapping: false,
                guest_pages: None,
            },
        ) {
            Some(Ok(Reply::Object(o))) => o.object,
            r => panic!("{r:?}"),
        };
        let ctx = match submit(&state, 2, Request::AcquireInit) {
            Some(Ok(Reply::Acquire { ctx, .. })) => ctx,
            r => panic!("{r:?}"),
        };
        let lock = Request::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        };
        assert_eq!(submit(&state, 3, lock), Some(Ok(Reply::Empty)));
        let fence = Request::FenceAttach {
            ctx,
            object,
            usage: FenceUsage::Write,
            host: false,
        };
        assert!(matches!(
            submit(&state, 4, fence),
            Some(Ok(Reply::Fence(_)))
        ));
        for token in 100..2100u64 {
            let wait = Request::Wait {
                object,
                usage: FenceUsage::Write,
                timeout_ns: 200_000,
            };
            assert_eq!(submit(&state, token, wait), None, "parks");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let done = state.lock().take_completions_for(0);
                if let Some(c) = done.into_iter().find(|c| c.origin.token == token) {
                    assert_eq!(c.response, Err(Status::TimedOut));
                    break;
                }
                assert!(Instant::now() < deadline, "WAIT {token} never timed out");
                std::thread::yield_now();
            }
        }
        state.stop_timer();
        timer.join().expect("timer thread");
    }
}
