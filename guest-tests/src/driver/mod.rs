// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest driver: split virtqueues over guest memory and a typed client
//! of the device contract, independent of how the memory and the
//! notifications are provided (loopback VMM here, a real guest later).

pub mod client;
pub mod memory;
pub mod notify;
pub mod split;

pub use client::{
    begin_cpu_access_request, check_response, lock_request, reply_capacity, BatchItem, ChainLayout,
    Driver, DriverConfig, DriverError, EventRecord, Outcome, RawChain, RawCompletion, RawDesc,
    Ticket,
};
pub use memory::{Buffer, BufferPool, GuestMemory, MemError, PoolError, VmGuestMemory};
pub use notify::{EventFdNotifier, Notifier};
pub use split::{need_event, Desc, QueueError, RingLayout, SplitQueue};
