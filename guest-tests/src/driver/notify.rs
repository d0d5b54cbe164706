// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Notifications in both directions: the driver kicks a queue, the device
//! interrupts it. A real guest does an MMIO/PIO write and takes an MSI-X
//! vector; the loopback VMM uses the vhost-user kick and call eventfds.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Driver-to-device and device-to-driver notification for each queue.
pub trait Notifier: Send + Sync {
    /// Tells the device that queue `queue` has new available buffers.
    fn kick(&self, queue: u16) -> io::Result<()>;

    /// Waits until the device interrupts queue `queue` or `timeout` passes.
    /// Returns whether an interrupt arrived (and consumes it).
    fn wait(&self, queue: u16, timeout: Duration) -> io::Result<bool>;
}

/// One kick and one call eventfd per queue, as vhost-user passes them with
/// `SET_VRING_KICK`/`SET_VRING_CALL` (both non-blocking).
#[derive(Debug)]
pub struct EventFdNotifier {
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    kick_count: Vec<AtomicU64>,
    interrupt_count: Vec<AtomicU64>,
}

fn no_queue(queue: u16) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no queue {queue}"))
}

impl EventFdNotifier {
    pub fn new(num_queues: u16) -> io::Result<Self> {
        let make = || {
            (0..num_queues)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<Vec<_>>>()
        };
        Ok(EventFdNotifier {
            kicks: make()?,
            calls: make()?,
            kick_count: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            interrupt_count: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The eventfd the device reads kicks from.
    pub fn kick_fd(&self, queue: u16) -> Option<&EventFd> {
        self.kicks.get(usize::from(queue))
    }

    /// The eventfd the device writes interrupts to.
    pub fn call_fd(&self, queue: u16) -> Option<&EventFd> {
        self.calls.get(usize::from(queue))
    }

    /// How many times the driver kicked `queue`.
    pub fn kicks(&self, queue: u16) -> u64 {
        self.kick_count
            .get(usize::from(queue))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// How many interrupts (eventfd counts) the driver consumed on `queue`.
    pub fn interrupts(&self, queue: u16) -> u64 {
        self.interrupt_count
            .get(usize::from(queue))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Notifier for EventFdNotifier {
    fn kick(&self, queue: u16) -> io::Result<()> {
        let fd = self.kick_fd(queue).ok_or_else(|| no_queue(queue))?;
        fd.write(1)?;
        if let Some(c) = self.kick_count.get(usize::from(queue)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn wait(&self, queue: u16, timeout: Duration) -> io::Result<bool> {
        let fd = self.call_fd(queue).ok_or_else(|| no_queue(queue))?;
        if !poll_readable(fd, timeout)? {
            return Ok(false);
        }
        match fd.read() {
            Ok(n) => {
                if let Some(c) = self.interrupt_count.get(usize::from(queue)) {
                    c.fetch_add(n, Ordering::Relaxed);
                }
                Ok(true)
            }
            // Another waiter consumed it first.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
pub fn poll_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pfd` is one valid, initialised pollfd that outlives the
        // call, and the count passed is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0 && pfd.revents & libc::POLLIN != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
