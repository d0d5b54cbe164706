//! vhost-device-dmabuf: a vhost-user back-end for the virtio-dmabuf device
//! (virtio ID 37), sharing host dma-buf memory with guests.
//!
//! - [`exporter`]: the dma-buf model (objects, attachments, the reservation
//!   lock, fences, cached mappings, direction-to-sync rules).
//! - [`provider`]: host memory (memfd, udmabuf, dma-heap, imported dma-bufs).

pub mod control;
pub mod exporter;
pub mod provider;
pub mod state;
