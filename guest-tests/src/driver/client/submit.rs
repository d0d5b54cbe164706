// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Submission: typed, sized, raw and batched chains made available on a queue.

use super::*;

impl Driver {
    /// Submits `request` on `queue` with a fresh tag.
    pub fn submit(&self, queue: u16, request: &Request) -> Result<Ticket, DriverError> {
        self.submit_sized(queue, self.next_tag(), request, reply_capacity(request))
    }

    /// Submits `request` with the given tag and `writable_len` bytes of
    /// writable part (response header included).
    pub fn submit_sized(
        &self,
        queue: u16,
        tag: u64,
        request: &Request,
        writable_len: usize,
    ) -> Result<Ticket, DriverError> {
        let mut tickets =
            self.submit_batch(queue, &[self.typed_item(tag, request, writable_len)])?;
        tickets.pop().ok_or(DriverError::NoSuchQueue(queue))
    }

    /// A typed request as a batch item, cut by the current [`ChainLayout`].
    pub fn typed_item(&self, tag: u64, request: &Request, writable_len: usize) -> BatchItem {
        let bytes = encode_request(tag, request);
        let layout = self.chain_layout().within(
            bytes.len(),
            writable_len,
            usize::from(self.config.queue_size),
        );
        let chain = RawChain::chunked(&bytes, writable_len, &layout);
        BatchItem {
            chain,
            tag,
            opcode: Some(request.opcode()),
        }
    }

    /// Submits a raw chain. The ticket's tag is read from the first 16
    /// readable bytes when they form a header, else 0.
    pub fn submit_raw(&self, queue: u16, chain: RawChain) -> Result<Ticket, DriverError> {
        let mut tickets = self.submit_batch(queue, &[BatchItem::raw(chain)])?;
        tickets.pop().ok_or(DriverError::NoSuchQueue(queue))
    }

    /// Makes every item available at once: one `avail.idx` update and at
    /// most one kick for the whole batch.
    pub fn submit_batch(
        &self,
        queue: u16,
        items: &[BatchItem],
    ) -> Result<Vec<Ticket>, DriverError> {
        let qm = self.queue(queue)?;
        let mut prepared = Vec::with_capacity(items.len());
        for item in items {
            match self.prepare(&item.chain) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    prepared
                        .into_iter()
                        .for_each(|p: Prepared| self.free_buffers(p.buffers));
                    return Err(e);
                }
            }
        }
        let size = self.config.queue_size;
        if let Some(p) = prepared.iter().find(|p| p.descs.len() > usize::from(size)) {
            let len = p.descs.len();
            prepared
                .into_iter()
                .for_each(|p| self.free_buffers(p.buffers));
            return Err(DriverError::Queue {
                queue,
                source: QueueError::ChainTooLong { len, size },
            });
        }
        let mut q = lock(qm);
        // Room first, so a batch goes in whole or not at all.
        let needed: usize = prepared.iter().map(|p| p.ring_slots()).sum();
        if q.ring.num_free() < needed {
            self.drain(&mut q, queue)?;
        }
        if q.ring.num_free() < needed {
            let free = q.ring.num_free();
            drop(q);
            prepared
                .into_iter()
                .for_each(|p| self.free_buffers(p.buffers));
            return Err(DriverError::Queue {
                queue,
                source: QueueError::Full { needed, free },
            });
        }
        let mut tickets = Vec::with_capacity(items.len());
        let mut prepared = prepared.into_iter();
        for item in items {
            let Some(p) = prepared.next() else { break };
            let table = p.table.map(|t| t.gpa);
            let head = match q.ring.add(&*self.mem, &p.descs, table, p.looped) {
                Ok(head) => head,
                Err(e) => {
                    self.free_buffers(p.buffers);
                    prepared.for_each(|p| self.free_buffers(p.buffers));
                    // What was added so far still goes to the device.
                    self.publish(&mut q, queue)?;
                    return Err(DriverError::Queue { queue, source: e });
                }
            };
            let seq = self.track(&mut q, head, p, false);
            tickets.push(Ticket {
                queue,
                seq,
                tag: item.tag,
                opcode: item.opcode,
            });
        }
        self.publish(&mut q, queue)?;
        Ok(tickets)
    }

    /// Records the chain `p` added at `head` as in flight; returns its
    /// sequence number.
    pub(super) fn track(&self, q: &mut QueueState, head: u16, p: Prepared, is_event: bool) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        q.inflight.insert(
            head,
            Inflight {
                seq,
                buffers: p.buffers,
                writable: p.writable,
                is_event,
            },
        );
        seq
    }

    pub(super) fn publish(&self, q: &mut QueueState, queue: u16) -> Result<(), DriverError> {
        if q.ring
            .publish(&*self.mem)
            .map_err(DriverError::queue(queue))?
        {
            self.notifier
                .kick(queue)
                .map_err(|source| DriverError::Notify { queue, source })?;
        }
        Ok(())
    }

    /// Allocates and fills the buffers of a chain.
    pub(super) fn prepare(&self, chain: &RawChain) -> Result<Prepared, DriverError> {
        let mut p = Prepared {
            looped: chain.looped,
            ..Prepared::default()
        };
        let result = (|| {
            for d in &chain.descs {
                match d {
                    RawDesc::Readable(bytes) => {
                        let b = self.pool.alloc(bytes.len() as u64, 8)?;
                        p.buffers.push(b);
                        self.mem.write(b.gpa, bytes)?;
                        p.descs.push(Desc {
                            addr: b.gpa,
                            len: len_u32(bytes.len()),
                            write: false,
                        });
                    }
                    RawDesc::Writable(len) => {
                        let b = self.pool.alloc(u64::from(*len), 8)?;
                        p.buffers.push(b);
                        self.mem.write(b.gpa, &vec![0u8; *len as usize])?;
                        p.descs.push(Desc {
                            addr: b.gpa,
                            len: *len,
                            write: true,
                        });
                        p.writable.push((b.gpa, *len));
                    }
                    RawDesc::At(desc) => p.descs.push(*desc),
                }
            }
            if chain.indirect {
                let table = self.pool.alloc(DESC_SIZE * p.descs.len() as u64, 16)?;
                p.buffers.push(table);
                p.table = Some(table);
            }
            Ok::<(), DriverError>(())
        })();
        match result {
            Ok(()) => Ok(p),
            Err(e) => {
                self.free_buffers(p.buffers);
                Err(e)
            }
        }
    }

    pub(super) fn free_buffers(&self, buffers: Vec<Buffer>) {
        for b in buffers {
            self.pool.free(b);
        }
    }
}
