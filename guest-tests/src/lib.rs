// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's side of the virtio-dmabuf device (virtio ID 37).
//!
//! - [`driver`]: split virtqueues over guest memory and a typed client of
//!   the device contract (`docs/guest-tests.md`), usable from any transport.
//! - [`vmm`]: a loopback VMM that plays the front-end (the `vhost` crate's
//!   `Frontend`, as Cloud Hypervisor uses it) against the daemon's socket:
//!   guest RAM in memfds, vrings with eventfds, the shared memory window and
//!   the shared-object table.
//! - [`host`]: what the guest-side programs ask of the daemon's host side
//!   (evict, export, revoke, the sync record).
//! - [`importers`]: small programs that use the device as real dma-buf
//!   users do (a display, a GPU, a camera buffer, a blob shared by UUID).
//! - [`suite`]: a tiny scenario runner that reports passed, failed and
//!   skipped scenarios with reasons.

pub mod driver;
pub mod host;
pub mod host_link;
pub mod importers;
pub mod pci;
pub mod session;
pub mod suite;
pub mod vmm;
