// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon behind the virtio-dmabuf device (virtio ID 37): a back-end
//! for a VMM's front-end, sharing host dma-buf memory with guests.
//!
//! - [`exporter`]: the dma-buf model (objects, attachments, the reservation
//!   lock, fences, cached mappings, direction-to-sync rules).
//! - [`provider`]: host memory (memfd, udmabuf, dma-heap, imported dma-bufs).
//! - [`state`]: the model shared by every thread, and its wake-ups; the
//!   daemon's locking rules.
//! - [`backend`]: everything that speaks to a front-end: one connection's
//!   descriptor chains in, exporter calls, responses out; the back-end
//!   channel; what the model asks of a front-end; guest RAM pages as object
//!   backing; the listener thread of each guest socket.
//! - [`daemon`]: start, run and stop the whole daemon.
//! - [`args`]: the command line.
//! - [`control`]: the host control socket and the `ctl` client.
//! - [`activation`]: sockets handed over (`--socket-fd`, systemd socket
//!   activation) and readiness (`sd_notify`).
//! - [`manual`]: the man pages and shell completions, from [`args`].
//!
//! With the cargo feature `fuzzing` (never in a release build), a hidden
//! `fuzzing` module gives the fuzz targets of `fuzz/` their hooks into
//! these paths (`docs/fuzzing.md`).

pub mod activation;
pub mod args;
pub mod backend;
pub mod control;
pub mod daemon;
pub mod exporter;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod manual;
pub mod provider;
pub mod state;
