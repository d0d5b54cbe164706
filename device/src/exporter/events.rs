// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Pending eventq events of one guest (contract section 8).

use std::collections::VecDeque;

use virtio_dmabuf_protocol::{Event, EventType};

/// Events wait here until the driver posts buffers. At most `limit` are
/// kept; the rest are counted and reported by one OVERFLOW event after the
/// kept ones.
#[derive(Debug)]
pub(crate) struct EventQueue {
    kept: VecDeque<Event>,
    dropped: u64,
    limit: usize,
}

impl EventQueue {
    pub fn new(limit: usize) -> Self {
        EventQueue {
            kept: VecDeque::new(),
            dropped: 0,
            limit,
        }
    }

    pub fn push(&mut self, event: Event) {
        // A newer MOVE_NOTIFY for the same attachment replaces the pending
        // one in place: only the latest generation matters to the driver.
        if event.kind == EventType::MoveNotify {
            if let Some(old) = self
                .kept
                .iter_mut()
                .find(|e| e.kind == EventType::MoveNotify && e.attachment == event.attachment)
            {
                old.data = event.data;
                return;
            }
        }
        if self.kept.len() < self.limit {
            self.kept.push_back(event);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    pub fn pop(&mut self) -> Option<Event> {
        if let Some(e) = self.kept.pop_front() {
            return Some(e);
        }
        if self.dropped > 0 {
            let data = std::mem::take(&mut self.dropped);
            return Some(Event {
                kind: EventType::Overflow,
                object: 0,
                attachment: 0,
                data,
            });
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.dropped == 0
    }

    pub fn clear(&mut self) {
        self.kept.clear();
        self.dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(attachment: u64, generation: u64) -> Event {
        Event {
            kind: EventType::MoveNotify,
            object: 1,
            attachment,
            data: generation,
        }
    }

    #[test]
    fn move_notify_for_same_attachment_replaces_pending_one() {
        let mut q = EventQueue::new(4);
        q.push(mv(7, 1));
        q.push(mv(8, 1));
        q.push(mv(7, 2));
        assert_eq!(q.pop(), Some(mv(7, 2)));
        assert_eq!(q.pop(), Some(mv(8, 1)));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn overflow_follows_kept_events_with_dropped_count() {
        let mut q = EventQueue::new(2);
        for a in 1..=5 {
            q.push(mv(a, 1));
        }
        assert_eq!(q.pop(), Some(mv(1, 1)));
        assert_eq!(q.pop(), Some(mv(2, 1)));
        let o = q.pop().expect("overflow event");
        assert_eq!((o.kind, o.data), (EventType::Overflow, 3));
        assert!(q.is_empty());
    }
}
