//! The state every thread of the daemon shares: the exporter behind one
//! lock, and the wake-ups that tell a guest's worker (or the control plane)
//! that something for it changed elsewhere.
//!
//! A guest's vring worker submits requests and drains its own completions
//! and events. Anything else that changes the model (another guest's
//! request, a host command, a timer) may complete that guest's parked
//! requests or queue its events, so after every change the changer calls
//! [`DeviceState::changed`], which writes the eventfds of the guests that
//! have something to deliver and nudges the timer thread.
//!
//! The timer thread is the daemon's one place that waits for time and for
//! the host kernel: it polls its wake-up eventfd and the host fence
//! watches of parked requests (`exporter/host_fences.rs`) with the next
//! deadline as the timeout, so a host fence signalling re-runs the request
//! that waited for it, and nothing ever blocks on a fence.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
    /// next deadline: written on every change.
    timer_wake: EventFd,
    timer_stop: AtomicBool,
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
        }))
    }

    /// The model. A panic while it was held cannot be recovered from in a
    /// meaningful way, but serving the other guests beats aborting them all.
    pub fn lock(&self) -> MutexGuard<'_, Exporter> {
        self.exporter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd a guest's worker listens on.
    pub fn guest_wake(&self, guest: GuestId) -> Option<&EventFd> {
        self.guest_wake.get(guest)
    }

    /// The eventfd the control plane listens on.
    pub fn control_wake(&self) -> &EventFd {
        &self.control_wake
    }

    /// Call after any change to the model (with the lock released or held):
    /// wakes each guest that has something to deliver, the control plane,
    /// and the timer thread (the next deadline may have moved).
    pub fn changed(&self, exporter: &Exporter) {
        self.notify(exporter);
        // A full counter still wakes the reader; nothing is lost.
        let _ = self.timer_wake.write(1);
    }

    /// Wakes the guests with something to deliver and the control plane.
    fn notify(&self, exporter: &Exporter) {
        for (guest, fd) in self.guest_wake.iter().enumerate() {
            if exporter.has_completions(guest) || exporter.has_events(guest) {
                let _ = fd.write(1);
            }
        }
        let _ = self.control_wake.write(1);
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
            if self.timer_stop.load(Ordering::SeqCst) {
                return;
            }
            // Empty the wake-up before looking at the model: a change made
            // after this (a new deadline, a new watch) ends the poll below
            // at once, however the threads interleave. Emptying it after
            // the model would lose a wake-up that landed in between.
            let _ = self.timer_wake.read();
            let (deadline, watches) = {
                let mut ex = self.lock();
                let now = Instant::now();
                if ex.next_deadline().is_some_and(|d| d <= now) {
                    ex.tick(now);
                    self.notify(&ex);
                }
                (ex.next_deadline(), ex.host_watches())
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
        let mut ex = Exporter::new(
            ExporterConfig::default(),
            Box::new(MemfdProvider::new(1 << 20)),
            1,
        );
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
