// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The dma-heap provider (section 10): dma-bufs from the system heap,
//! `/dev/dma_heap/system`.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};
use virtio_dmabuf_protocol::ProviderKind;

use super::imported::KernelDmabuf;
use super::udmabuf::open_node;
use super::{check_alloc_size, Backing, Provider, ProviderError};

/// The system heap's device node.
pub const DMA_HEAP_SYSTEM_NODE: &str = "/dev/dma_heap/system";

/// `struct dma_heap_allocation_data` of `<linux/dma-heap.h>`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct DmaHeapAllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `DMA_HEAP_IOCTL_ALLOC` = `_IOWR('H', 0, struct dma_heap_allocation_data)`
/// = 0xC0184800.
const DMA_HEAP_IOCTL_ALLOC: Opcode = opcode::read_write::<DmaHeapAllocationData>(b'H', 0);

/// `DMA_HEAP_IOCTL_ALLOC`: a new zero-filled dma-buf of `len` bytes from
/// the heap `heap` (an open `/dev/dma_heap/NAME`), opened read-write and
/// close-on-exec.
pub fn dma_heap_alloc(heap: BorrowedFd<'_>, len: u64) -> Result<OwnedFd, ProviderError> {
    let fd_flags = u32::try_from(libc::O_RDWR | libc::O_CLOEXEC).unwrap_or_default();
    loop {
        let mut data = DmaHeapAllocationData {
            len,
            fd: 0,
            fd_flags,
            heap_flags: 0,
        };
        // SAFETY: DMA_HEAP_IOCTL_ALLOC reads and writes exactly one
        // `struct dma_heap_allocation_data`, whose layout `data` has; `data`
        // lives across the call.
        match unsafe { ioctl(heap, Updater::<DMA_HEAP_IOCTL_ALLOC, _>::new(&mut data)) } {
            Ok(()) => {
                let raw = i32::try_from(data.fd)
                    .map_err(|_| ProviderError::host("DMA_HEAP_IOCTL_ALLOC", Errno::BADF))?;
                // SAFETY: on success the kernel stored a new fd in `data.fd`
                // that nothing else owns; it is wrapped exactly once, here.
                return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(ProviderError::host("DMA_HEAP_IOCTL_ALLOC", e)),
        }
    }
}

/// Hands out system-heap dma-bufs.
#[derive(Debug)]
pub struct DmaHeapProvider {
    heap: OwnedFd,
    max_object_size: u64,
}

impl DmaHeapProvider {
    /// Opens `/dev/dma_heap/system`. The heap has no per-buffer limit of its
    /// own, so `max_object_size` is the daemon's.
    pub fn open(max_object_size: u64) -> Result<Self, ProviderError> {
        let heap = open_node(
            DMA_HEAP_SYSTEM_NODE,
            "dma-heap",
            "open /dev/dma_heap/system",
        )?;
        Ok(DmaHeapProvider {
            heap,
            max_object_size,
        })
    }
}

impl Provider for DmaHeapProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::DmaHeap
    }

    fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    fn makes_real_dmabufs(&self) -> bool {
        true
    }

    fn allocate(&self, size: u64) -> Result<Box<dyn Backing>, ProviderError> {
        check_alloc_size(size, self.max_object_size)?;
        let fd = dma_heap_alloc(self.heap.as_fd(), size)?;
        Ok(Box::new(KernelDmabuf::new(fd, size, "dma-heap")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::dma_buf_sync;
    use crate::provider::page_size;
    use rustix::fs::{memfd_create, MemfdFlags};
    use virtio_dmabuf_protocol::sync_flags::{END, READ, RW, START};

    #[test]
    fn dma_heap_ioctl_number_matches_the_contract() {
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xC018_4800);
    }

    #[test]
    fn dma_heap_alloc_reaches_the_kernel() {
        let not_a_heap = memfd_create("not-a-heap", MemfdFlags::CLOEXEC).expect("memfd");
        let err = dma_heap_alloc(not_a_heap.as_fd(), 4096).expect_err("ENOTTY");
        assert!(matches!(
            err,
            ProviderError::Host {
                op: "DMA_HEAP_IOCTL_ALLOC",
                ..
            }
        ));
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }

    #[test]
    fn missing_dma_heap_names_the_device_node() {
        match DmaHeapProvider::open(16 * page_size()) {
            Err(err @ ProviderError::MissingDevice { .. }) => {
                assert!(!std::path::Path::new(DMA_HEAP_SYSTEM_NODE).exists());
                assert!(matches!(
                    err,
                    ProviderError::MissingDevice {
                        what: "dma-heap",
                        node: "/dev/dma_heap/system"
                    }
                ));
                assert!(err.to_string().contains(DMA_HEAP_SYSTEM_NODE), "{err}");
                println!(
                    "dma-heap real path skipped: {DMA_HEAP_SYSTEM_NODE} does not exist on this host"
                );
            }
            Err(other) => panic!("{DMA_HEAP_SYSTEM_NODE} exists but cannot be used: {other}"),
            Ok(p) => exercise_real_dma_heap(&p),
        }
    }

    /// The system heap, or `None` with the reason printed where the host
    /// has none.
    fn real_heap(test: &str) -> Option<DmaHeapProvider> {
        match DmaHeapProvider::open(16 * page_size()) {
            Ok(p) => Some(p),
            Err(ProviderError::MissingDevice { node, .. }) => {
                println!("{test} skipped: {node} does not exist on this host");
                None
            }
            Err(e) => panic!("{DMA_HEAP_SYSTEM_NODE} exists but cannot be used: {e}"),
        }
    }

    #[test]
    fn dma_heap_kernel_refuses_bad_sync_flags_with_einval() {
        let Some(p) = real_heap("dma-heap bad sync flags") else {
            return;
        };
        let fd = dma_heap_alloc(p.heap.as_fd(), page_size()).expect("alloc");
        crate::provider::sync::assert_kernel_refuses_bad_flags(fd.as_fd());
    }

    #[test]
    fn dma_heap_end_without_start_is_accepted() {
        let Some(p) = real_heap("dma-heap END without START") else {
            return;
        };
        // The system heap keeps no CPU-access state: its end_cpu_access
        // syncs whatever attachments are mapped (none here) and answers 0.
        let fd = dma_heap_alloc(p.heap.as_fd(), page_size()).expect("alloc");
        dma_buf_sync(fd.as_fd(), END | RW).expect("END on a fresh buffer");
        dma_buf_sync(fd.as_fd(), END | READ).expect("END again");
        println!("dma-heap (system): END without START is OK");
    }

    /// The real path, run where the host has the system heap.
    fn exercise_real_dma_heap(p: &DmaHeapProvider) {
        let page = page_size();
        assert_eq!(p.kind(), ProviderKind::DmaHeap);
        assert!(p.makes_real_dmabufs());
        let b = p.allocate(3 * page).expect("allocate");
        assert!(b.is_real_dmabuf());
        assert_eq!(b.size(), 3 * page);
        let mut all = vec![0xa5u8; (3 * page) as usize];
        b.sync(START | RW).expect("sync start");
        b.read_at(0, &mut all).expect("read");
        assert!(all.iter().all(|&x| x == 0), "zero-filled");
        b.write_at(2 * page, b"heap").expect("write");
        b.sync(END | RW).expect("sync end");
        b.sync(START | RW).expect("sync start");
        let mut out = [0u8; 4];
        b.read_at(2 * page, &mut out).expect("read");
        assert_eq!(&out, b"heap");
        b.sync(END | RW).expect("sync end");
        assert!(matches!(
            p.allocate(17 * page),
            Err(ProviderError::BadSize { .. })
        ));
    }
}
