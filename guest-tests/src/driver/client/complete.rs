// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Completion: draining the used rings, waiting for tickets, and the eventq.

use super::*;

impl Driver {
    /// Moves every used entry of `queue` into the completion table.
    pub(super) fn drain(&self, q: &mut QueueState, queue: u16) -> Result<(), DriverError> {
        while let Some((head, used_len)) = q
            .ring
            .pop_used(&*self.mem)
            .map_err(DriverError::queue(queue))?
        {
            // `pop_used` only returns heads of chains it handed out, and
            // every such chain has an entry here.
            let Some(inflight) = q.inflight.remove(&head) else {
                continue;
            };
            let capacity: usize = inflight.writable.iter().map(|&(_, l)| l as usize).sum();
            let mut left = (used_len as usize).min(capacity);
            let mut written = Vec::with_capacity(left);
            for &(gpa, len) in &inflight.writable {
                if left == 0 {
                    break;
                }
                let n = left.min(len as usize);
                let mut buf = vec![0u8; n];
                self.mem.read(gpa, &mut buf)?;
                written.extend_from_slice(&buf);
                left -= n;
            }
            self.free_buffers(inflight.buffers);
            let completion = RawCompletion {
                used_len,
                written,
                capacity,
            };
            if inflight.is_event {
                q.events.push_back(completion);
            } else if !q.abandoned.remove(&inflight.seq) {
                q.done.insert(inflight.seq, completion);
            }
        }
        Ok(())
    }

    /// Waits until `pred` holds for the queue state, draining completions
    /// and sleeping on the queue's interrupt in between.
    pub(super) fn wait_until<T>(
        &self,
        queue: u16,
        timeout: Duration,
        mut pred: impl FnMut(&mut QueueState) -> Option<T>,
    ) -> Result<Option<T>, DriverError> {
        let qm = self.queue(queue)?;
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut q = lock(qm);
                self.drain(&mut q, queue)?;
                if let Some(v) = pred(&mut q) {
                    return Ok(Some(v));
                }
                if q.ring
                    .enable_interrupts(&*self.mem)
                    .map_err(DriverError::queue(queue))?
                {
                    continue;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Short slices: another thread waiting on the same queue may
            // consume the interrupt meant for this completion.
            let slice = (deadline - now).min(Duration::from_millis(20));
            self.notifier
                .wait(queue, slice)
                .map_err(|source| DriverError::Notify { queue, source })?;
        }
    }

    /// Waits for a ticket's raw completion (default timeout).
    pub fn complete_raw(&self, ticket: Ticket) -> Result<RawCompletion, DriverError> {
        self.complete_raw_within(ticket, self.config.timeout)
    }

    /// Waits at most `timeout` for a ticket's raw completion. On timeout
    /// the chain is abandoned: its completion, if it ever comes, is dropped.
    pub fn complete_raw_within(
        &self,
        ticket: Ticket,
        timeout: Duration,
    ) -> Result<RawCompletion, DriverError> {
        let seq = ticket.seq;
        let found = self.wait_until(ticket.queue, timeout, |q| q.done.remove(&seq))?;
        match found {
            Some(c) => Ok(c),
            None => {
                if let Ok(qm) = self.queue(ticket.queue) {
                    lock(qm).abandoned.insert(seq);
                }
                Err(DriverError::Timeout {
                    queue: ticket.queue,
                    timeout,
                    what: ticket
                        .opcode
                        .map_or_else(|| "raw chain".to_string(), |o| o.to_string()),
                })
            }
        }
    }

    /// Whether the ticket's chain has come back (without waiting).
    pub fn poll(&self, ticket: &Ticket) -> Result<bool, DriverError> {
        let qm = self.queue(ticket.queue)?;
        let mut q = lock(qm);
        self.drain(&mut q, ticket.queue)?;
        Ok(q.done.contains_key(&ticket.seq))
    }

    /// Takes the ticket's raw completion if its chain has come back,
    /// without waiting: `None` means it is still with the device.
    pub fn try_complete_raw(&self, ticket: &Ticket) -> Result<Option<RawCompletion>, DriverError> {
        let qm = self.queue(ticket.queue)?;
        let mut q = lock(qm);
        self.drain(&mut q, ticket.queue)?;
        Ok(q.done.remove(&ticket.seq))
    }

    /// The used ring's index of `queue` as the device last wrote it.
    pub fn device_used_idx(&self, queue: u16) -> Result<u16, DriverError> {
        let q = lock(self.queue(queue)?);
        q.ring
            .device_used_idx(&*self.mem)
            .map_err(DriverError::queue(queue))
    }

    /// Asks for an interrupt at `queue`'s next used entry, as a driver
    /// does before it sleeps: `true` when used entries are already there
    /// (look again instead of sleeping).
    pub fn arm_interrupts(&self, queue: u16) -> Result<bool, DriverError> {
        let mut q = lock(self.queue(queue)?);
        q.ring
            .enable_interrupts(&*self.mem)
            .map_err(DriverError::queue(queue))
    }

    /// Stores `idx` in `queue`'s `used_event` (EVENT_IDX): the device
    /// interrupts once its used index passes it. The driver's own waits on
    /// `queue` store their own value again.
    pub fn set_used_event(&self, queue: u16, idx: u16) -> Result<(), DriverError> {
        let q = lock(self.queue(queue)?);
        q.ring
            .set_used_event(&*self.mem, idx)
            .map_err(DriverError::queue(queue))
    }

    /// Takes the ticket's typed response if its chain has come back,
    /// without waiting: `None` means it is still with the device. Once it
    /// answered `Some`, the completion is gone (the ticket is spent).
    pub fn try_complete(&self, ticket: &Ticket) -> Result<Option<Response>, DriverError> {
        let opcode = ticket.opcode.ok_or(DriverError::NotTyped(ticket.seq))?;
        self.try_complete_raw(ticket)?
            .map(|c| check_response(opcode, ticket.tag, &c))
            .transpose()
    }

    /// Waits up to `within` for the ticket's chain to come back, without
    /// taking the completion: `false` means it is still with the device
    /// (a parked request, say).
    pub fn settle(&self, ticket: &Ticket, within: Duration) -> Result<bool, DriverError> {
        let seq = ticket.seq;
        Ok(self
            .wait_until(ticket.queue, within, |q| {
                q.done.contains_key(&seq).then_some(())
            })?
            .is_some())
    }

    /// Whether the device has taken every chain made available on
    /// `queue`: its `avail_event` (EVENT_IDX) caught up with the avail
    /// index. Always `false` without EVENT_IDX (the device says nothing).
    pub fn device_took_all(&self, queue: u16) -> Result<bool, DriverError> {
        let q = lock(self.queue(queue)?);
        if !q.ring.event_idx() {
            return Ok(false);
        }
        let seen = q
            .ring
            .device_avail_event(&*self.mem)
            .map_err(DriverError::queue(queue))?;
        Ok(seen == q.ring.avail_idx())
    }

    /// Waits up to `within` until the device has taken every chain made
    /// available on `queue` ([`device_took_all`](Self::device_took_all)):
    /// a parked request is then with the device, not still in the ring.
    pub fn wait_taken(&self, queue: u16, within: Duration) -> Result<bool, DriverError> {
        let deadline = Instant::now() + within;
        loop {
            if self.device_took_all(queue)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for a typed ticket and decodes its response (default timeout).
    pub fn complete(&self, ticket: Ticket) -> Result<Response, DriverError> {
        self.complete_within(ticket, self.config.timeout)
    }

    /// Like [`complete`](Self::complete) with its own timeout.
    pub fn complete_within(
        &self,
        ticket: Ticket,
        timeout: Duration,
    ) -> Result<Response, DriverError> {
        let (tag, opcode) = (ticket.tag, ticket.opcode);
        let opcode = opcode.ok_or(DriverError::NotTyped(ticket.seq))?;
        let c = self.complete_raw_within(ticket, timeout)?;
        check_response(opcode, tag, &c)
    }

    /// Submits on the controlq and waits.
    pub fn call(&self, request: &Request) -> Result<Response, DriverError> {
        self.call_on(CONTROLQ, request)
    }

    /// Submits on `queue` and waits.
    pub fn call_on(&self, queue: u16, request: &Request) -> Result<Response, DriverError> {
        let t = self.submit(queue, request)?;
        self.complete(t)
    }

    // ---- eventq ----

    /// Posts `count` device-writable buffers of `len` bytes on the eventq.
    pub fn post_event_buffers(&self, count: usize, len: u32) -> Result<(), DriverError> {
        let qm = self.queue(EVENTQ)?;
        let mut q = lock(qm);
        for _ in 0..count {
            let p = self.prepare(&RawChain::new().writable(len))?;
            let head = match q.ring.add(&*self.mem, &p.descs, None, false) {
                Ok(head) => head,
                Err(e) => {
                    self.free_buffers(p.buffers);
                    self.publish(&mut q, EVENTQ)?;
                    return Err(DriverError::Queue {
                        queue: EVENTQ,
                        source: e,
                    });
                }
            };
            self.track(&mut q, head, p, true);
        }
        self.publish(&mut q, EVENTQ)
    }

    /// Event buffers the device still holds.
    pub fn posted_event_buffers(&self) -> usize {
        self.queues.get(usize::from(EVENTQ)).map_or(0, |q| {
            lock(q).inflight.values().filter(|i| i.is_event).count()
        })
    }

    /// Every event buffer returned so far, in used-ring order.
    pub fn poll_events(&self) -> Result<Vec<EventRecord>, DriverError> {
        let qm = self.queue(EVENTQ)?;
        let mut q = lock(qm);
        self.drain(&mut q, EVENTQ)?;
        Ok(q.events.drain(..).map(event_record).collect())
    }

    /// Waits up to `timeout` for the next returned event buffer.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<EventRecord>, DriverError> {
        Ok(self
            .wait_until(EVENTQ, timeout, |q| q.events.pop_front())?
            .map(event_record))
    }
}
