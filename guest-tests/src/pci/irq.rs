// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Notifications over virtio-pci with INTx: kicks are writes to the
//! notification structure, interrupts come through `/dev/uioN`.
//!
//! One INTx line serves every queue and the config change, so an
//! interrupt says only "look": the ISR status byte (read once per
//! interrupt, which also deasserts the line, virtio 1.2 section 4.1.4.5)
//! tells a queue interrupt (bit 0) from a configuration change (bit 1),
//! not which queue.
//!
//! No wake-up is lost between threads: each serviced interrupt bumps a
//! generation counter (one for queues, one for the configuration), and a
//! waiter returns `true` whenever the counter moved since that queue's
//! last wait returned, whoever serviced the interrupt. Only one thread at
//! a time polls `/dev/uioN`; the others sleep on a condition variable the
//! poller signals after every interrupt, so a wake-up consumed by one
//! thread is seen by all. A waiter may therefore wake for another queue's
//! completion (the driver rechecks its used ring), never miss its own.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::driver::notify::poll_readable;
use crate::driver::Notifier;

use super::mmio::Region;
use super::sysfs::ConfigSpace;

/// ISR status bits.
pub const ISR_QUEUE: u8 = 1 << 0;
pub const ISR_CONFIG: u8 = 1 << 1;

#[derive(Debug, Default)]
struct IrqState {
    /// Serviced interrupts whose ISR had the queue bit.
    queue_gen: u64,
    /// ... and the configuration bit.
    config_gen: u64,
    /// `queue_gen` as each queue's last successful wait saw it.
    queue_seen: Vec<u64>,
    config_seen: u64,
    /// Interrupts counted by `/dev/uioN` and serviced.
    interrupts: u64,
    /// A thread is in `poll` on `/dev/uioN`.
    polling: bool,
}

/// Interrupt counts since the session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqCounts {
    pub interrupts: u64,
    pub queue: u64,
    pub config: u64,
}

/// Where interrupts come from: waits at most `timeout` for one and
/// returns its ISR status byte, or `None` if none came.
pub trait IrqSource: Send + Sync {
    fn next(&self, timeout: Duration) -> io::Result<Option<u8>>;
}

/// The interrupt side of `/dev/uioN` of a device bound to
/// `uio_pci_generic`.
#[derive(Debug)]
pub struct UioIrq {
    isr: Region,
    uio: Arc<File>,
    config: Arc<ConfigSpace>,
}

fn to_io(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl UioIrq {
    pub fn new(isr: Region, uio: Arc<File>, config: Arc<ConfigSpace>) -> UioIrq {
        UioIrq { isr, uio, config }
    }

    /// Forgets whatever was pending before the device was (re)started: a
    /// stale uio count, the ISR, the INTx mask.
    pub fn clear(&self) -> io::Result<()> {
        self.read_count()?;
        self.isr.read8(0).map_err(to_io)?;
        self.config.unmask_intx().map_err(to_io)
    }

    /// The interrupt count `/dev/uioN` holds, if it moved since the last
    /// read (the descriptor is non-blocking).
    fn read_count(&self) -> io::Result<Option<u32>> {
        let mut b = [0u8; 4];
        match (&*self.uio).read(&mut b) {
            Ok(4) => Ok(Some(u32::from_ne_bytes(b))),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("uio read returned {n} bytes, not 4"),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl IrqSource for UioIrq {
    /// Polls `/dev/uioN`; on an interrupt reads the ISR (deasserting INTx)
    /// and then unmasks INTx, so an interrupt raised after the ISR read
    /// asserts the line again and is not lost.
    fn next(&self, timeout: Duration) -> io::Result<Option<u8>> {
        if !poll_readable(&*self.uio, timeout)? || self.read_count()?.is_none() {
            return Ok(None);
        }
        let isr = self.isr.read8(0).map_err(to_io)?;
        self.config.unmask_intx().map_err(to_io)?;
        Ok(Some(isr))
    }
}

/// Interrupt generations over one [`IrqSource`], shared by every waiter.
#[derive(Debug)]
pub struct Interrupts<S> {
    source: S,
    state: Mutex<IrqState>,
    wake: Condvar,
}

impl<S: IrqSource> Interrupts<S> {
    pub fn new(source: S, num_queues: u16) -> Self {
        let state = IrqState {
            queue_seen: vec![0; usize::from(num_queues)],
            ..IrqState::default()
        };
        Interrupts {
            source,
            state: Mutex::new(state),
            wake: Condvar::new(),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    fn state(&self) -> MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts since the start.
    pub fn counts(&self) -> IrqCounts {
        let st = self.state();
        IrqCounts {
            interrupts: st.interrupts,
            queue: st.queue_gen,
            config: st.config_gen,
        }
    }

    /// Waits until a queue interrupt that `queue`'s previous successful
    /// wait has not seen, or `timeout`.
    pub fn wait_queue(&self, queue: u16, timeout: Duration) -> io::Result<bool> {
        let q = usize::from(queue);
        if q >= self.state().queue_seen.len() {
            return Err(no_queue(queue));
        }
        self.wait_for(timeout, |st| {
            let moved = st.queue_gen != st.queue_seen[q];
            st.queue_seen[q] = st.queue_gen;
            moved
        })
    }

    /// Waits until the device signals a configuration change that the
    /// previous successful call has not seen, or `timeout`.
    pub fn wait_config(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_for(timeout, |st| {
            let moved = st.config_gen != st.config_seen;
            st.config_seen = st.config_gen;
            moved
        })
    }

    /// Waits until `ready` holds, polling the source as the one poller or
    /// sleeping until the poller has serviced an interrupt.
    fn wait_for(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut IrqState) -> bool,
    ) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        loop {
            if ready(&mut st) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let left = deadline - now;
            if st.polling {
                st = self
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            st.polling = true;
            drop(st);
            let serviced = self.source.next(left);
            st = self.state();
            st.polling = false;
            if let Ok(Some(isr)) = serviced {
                st.interrupts += 1;
                if isr & ISR_QUEUE != 0 {
                    st.queue_gen += 1;
                }
                if isr & ISR_CONFIG != 0 {
                    st.config_gen += 1;
                }
            }
            // Wakes the sleepers both to look at the counters and to take
            // over polling.
            self.wake.notify_all();
            serviced?;
        }
    }
}

fn no_queue(queue: u16) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no queue {queue}"))
}

/// [`Notifier`] of a virtio-pci device bound to `uio_pci_generic`.
#[derive(Debug)]
pub struct PciNotifier {
    notify: Region,
    /// Offset of each queue's notification address in `notify`.
    queue_offsets: Vec<u64>,
    irq: Interrupts<UioIrq>,
}

impl PciNotifier {
    /// `queue_offsets[q]` is `queue_notify_off(q) * notify_off_multiplier`
    /// (section 4.1.4.4).
    pub fn new(notify: Region, queue_offsets: Vec<u64>, irq: UioIrq) -> PciNotifier {
        let n = u16::try_from(queue_offsets.len()).unwrap_or(u16::MAX);
        PciNotifier {
            notify,
            queue_offsets,
            irq: Interrupts::new(irq, n),
        }
    }

    pub fn interrupts(&self) -> &Interrupts<UioIrq> {
        &self.irq
    }
}

impl Notifier for PciNotifier {
    fn kick(&self, queue: u16) -> io::Result<()> {
        let offset = *self
            .queue_offsets
            .get(usize::from(queue))
            .ok_or_else(|| no_queue(queue))?;
        // The ring update must reach memory before the device hears of it.
        fence(Ordering::SeqCst);
        self.notify.write16(offset, queue).map_err(to_io)
    }

    fn wait(&self, queue: u16, timeout: Duration) -> io::Result<bool> {
        self.irq.wait_queue(queue, timeout)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::thread;

    /// Interrupts from a channel: each message is one ISR value.
    struct FakeIrq(Mutex<Receiver<u8>>);

    impl IrqSource for FakeIrq {
        fn next(&self, timeout: Duration) -> io::Result<Option<u8>> {
            let rx = self.0.lock().unwrap();
            Ok(rx.recv_timeout(timeout).ok())
        }
    }

    fn fake(num_queues: u16) -> (Sender<u8>, Arc<Interrupts<FakeIrq>>) {
        let (tx, rx) = channel();
        (
            tx,
            Arc::new(Interrupts::new(FakeIrq(Mutex::new(rx)), num_queues)),
        )
    }

    const SHORT: Duration = Duration::from_millis(30);
    const LONG: Duration = Duration::from_secs(5);

    #[test]
    fn one_queue_interrupt_wakes_every_queue_once() {
        let (tx, irq) = fake(3);
        tx.send(ISR_QUEUE).unwrap();
        assert!(irq.wait_queue(0, LONG).unwrap());
        // Serviced by queue 0's wait, still seen by the others.
        assert!(irq.wait_queue(2, SHORT).unwrap());
        assert!(irq.wait_queue(1, SHORT).unwrap());
        assert!(!irq.wait_queue(0, SHORT).unwrap());
        assert!(!irq.wait_queue(2, SHORT).unwrap());
        assert_eq!(
            irq.counts(),
            IrqCounts {
                interrupts: 1,
                queue: 1,
                config: 0
            }
        );
    }

    #[test]
    fn a_sleeping_waiter_sees_the_interrupt_the_poller_took() {
        let (tx, irq) = fake(2);
        let waiters: Vec<_> = (0..2u16)
            .map(|q| {
                let irq = irq.clone();
                thread::spawn(move || irq.wait_queue(q, LONG).unwrap())
            })
            .collect();
        // Both are waiting (one polling, one asleep) before it comes.
        thread::sleep(Duration::from_millis(50));
        tx.send(ISR_QUEUE).unwrap();
        for w in waiters {
            assert!(w.join().unwrap());
        }
        assert_eq!(irq.counts().interrupts, 1);
    }

    #[test]
    fn config_changes_are_counted_apart_from_queues() {
        let (tx, irq) = fake(2);
        tx.send(ISR_CONFIG).unwrap();
        assert!(irq.wait_config(LONG).unwrap());
        assert!(!irq.wait_queue(0, SHORT).unwrap());
        tx.send(ISR_CONFIG | ISR_QUEUE).unwrap();
        assert!(irq.wait_queue(1, LONG).unwrap());
        assert!(irq.wait_config(SHORT).unwrap());
        assert!(!irq.wait_config(SHORT).unwrap());
    }

    #[test]
    fn an_interrupt_with_an_empty_isr_wakes_nobody() {
        let (tx, irq) = fake(2);
        tx.send(0).unwrap();
        assert!(!irq.wait_queue(0, SHORT).unwrap());
        assert_eq!(irq.counts().interrupts, 1);
        assert!(irq.wait_queue(2, SHORT).is_err());
    }
}
