//! vhost-device-dmabuf: a vhost-user back-end for the virtio-dmabuf device
//! (virtio ID 37), sharing host dma-buf memory with guests.
//!
//! - [`exporter`]: the dma-buf model (objects, attachments, the reservation
//!   lock, fences, cached mappings, direction-to-sync rules).
//! - [`provider`]: host memory (memfd, udmabuf, dma-heap, imported dma-bufs).
//! - [`state`]: the model shared by every thread, and its wake-ups.
//! - [`backend`]: the vhost-user back-end of one connection: descriptor
//!   chains in, exporter calls, responses out; the back-end channel.
//! - [`vhost_frontend`]: what the model asks of a front-end, over vhost-user.
//! - [`guest_memory`]: guest RAM pages as object backing.
//! - [`daemon`]: start, run and stop the whole daemon.
//! - [`args`]: the command line.
//! - [`control`]: the host control socket and the `ctl` client.
//! - [`activation`]: sockets handed over (`--socket-fd`, systemd socket
//!   activation) and readiness (`sd_notify`).
//! - [`manual`]: the man pages and shell completions, from [`args`].

pub mod activation;
pub mod args;
pub mod backend;
pub mod control;
pub mod daemon;
pub mod exporter;
pub mod guest_memory;
pub mod manual;
pub mod provider;
pub mod state;
pub mod vhost_frontend;
