// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host memory providers: memfd (default), udmabuf, dma-heap and imported
//! host dma-buf fds, and the host sync call (section 10 of the contract).
//!
//! A [`Provider`] hands out zero-filled [`Backing`] buffers. Kernel dma-bufs
//! (udmabuf, dma-heap, imported fds) get the real `DMA_BUF_IOCTL_SYNC`
//! ([`dma_buf_sync`]); memfd buffers get an emulation that validates the flags
//! as the kernel does, orders memory and records every call in a
//! [`SyncRecord`] (section 9).
//!
//! Host fences (`docs/protocol.md`, "Host fences"): `sync_file.rs` reads
//! the kernel's fences on a dma-buf without waiting, `fence_source/`
//! makes fences the daemon can signal (sw_sync, vgem) and installs them.

use std::fmt::{self, Debug};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::str::FromStr;

use virtio_dmabuf_protocol::ProviderKind;
use vm_memory::VolatileSlice;

mod dma_heap;
mod fence_source;
mod imported;
mod memfd;
mod mmap;
mod slab;
mod sync;
mod sync_file;
mod udmabuf;

pub use dma_heap::{dma_heap_alloc, DmaHeapProvider, DMA_HEAP_SYSTEM_NODE};
#[cfg(test)]
pub(crate) use fence_source::TestGpuBuffer;
pub use fence_source::{
    find_vgem_card, FenceSource, FenceSourceKind, InstalledFence, Signalled, DRI_DIR, SW_SYNC_NODE,
    VGEM_FENCE_LIFETIME,
};
pub use imported::KernelDmabuf;
pub use memfd::{MemfdBacking, MemfdProvider};
pub use slab::{SlabBacking, SlabPool, SlabStats, SLABS_PER_POOL, SLAB_MAX_EXTENT, SLAB_SIZE};
pub use sync::{dma_buf_sync, validate_sync_flags, SyncCall, SyncRecord};
pub use sync_file::{
    export_sync_file, host_fences, import_sync_file, poll_now, FenceInfo, FenceStatus, HostAccess,
    HostFences, SyncFile,
};
pub use udmabuf::{
    udmabuf_create, udmabuf_from_list, UdmabufProvider, UDMABUF_DEFAULT_LIST_LIMIT,
    UDMABUF_DEFAULT_SIZE_LIMIT, UDMABUF_NODE,
};

/// Errors of the host memory layer. Each keeps the host errno.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{what} is not available on this host: {node} is missing")]
    MissingDevice {
        what: &'static str,
        node: &'static str,
    },
    #[error("{op} failed: {source}")]
    Host {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", bad_size(*size, *max))]
    BadSize { size: u64, max: u64 },
    #[error("range {offset}+{len} is outside the buffer of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Memory the provider cannot turn into a dma-buf (udmabuf's rules).
    #[error("{0}")]
    Unsuitable(String),
}

impl ProviderError {
    /// A host call failure with the errno rustix reported.
    pub(crate) fn host(op: &'static str, errno: rustix::io::Errno) -> Self {
        ProviderError::Host {
            op,
            source: errno.into(),
        }
    }

    /// The host errno behind this error, if it came from a host call.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            ProviderError::Host { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One buffer of host memory backing an object.
pub trait Backing: Debug + Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The buffer's own fd: what the front-end gets (`SHMEM_MAP`,
    /// `GET_SHARED_OBJECT`) and the host kernel's fence calls take. `None`
    /// for a buffer without one: an extent of a slab ([`SlabBacking`],
    /// whose slab would expose other objects; the model promotes such an
    /// object to a memfd of its own before handing an fd out), and guest
    /// pages without a kernel dma-buf (never handed out).
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// True when `fd` is a kernel dma-buf (host syncs reach the kernel).
    fn is_real_dmabuf(&self) -> bool;
    /// True when nobody can shrink `fd` under a mapping of it: a kernel
    /// dma-buf, or a memfd sealed with `F_SEAL_SHRINK`. Only such a buffer
    /// is handed to the front-end for the shared-memory window
    /// (`SHMEM_MAP`): a file its owner truncates would fault the VMM with
    /// `SIGBUS` when the guest touches the window. Any other buffer is
    /// served through the copy path.
    fn size_is_fixed(&self) -> bool;
    /// One `DMA_BUF_IOCTL_SYNC` with these flags (section 9): the real ioctl on
    /// a kernel dma-buf (EINTR/EAGAIN retried), the recording emulation on memfd.
    fn sync(&self, flags: u64) -> Result<(), ProviderError>;
    /// Copies bytes out of the buffer.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError>;
    /// Copies bytes into the buffer.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError>;
    /// Copies guest memory into the buffer: the data of a `TRANSFER_TO_HOST`
    /// taken from where the chain holds it. This default goes through a
    /// bounce buffer; a buffer the kernel can copy into directly does that.
    fn write_from(&self, offset: u64, src: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        let mut bounce = vec![0u8; src.len()];
        src.copy_to(&mut bounce[..]);
        self.write_at(offset, &bounce)
    }
    /// Copies bytes out of the buffer into guest memory: the data of a
    /// `TRANSFER_FROM_HOST` put where the chain wants it. The default goes
    /// through a bounce buffer, as [`Backing::write_from`]'s does.
    fn read_into(&self, offset: u64, dst: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        let mut bounce = vec![0u8; dst.len()];
        self.read_at(offset, &mut bounce)?;
        dst.copy_from(&bounce[..]);
        Ok(())
    }
}

/// A source of new zero-filled buffers.
pub trait Provider: Debug + Send {
    fn kind(&self) -> ProviderKind;
    /// Largest buffer `allocate` accepts.
    fn max_object_size(&self) -> u64;
    /// True when `allocate` returns kernel dma-bufs.
    fn makes_real_dmabufs(&self) -> bool;
    /// A new zero-filled buffer of `size` bytes (a page multiple).
    fn allocate(&self, size: u64) -> Result<Box<dyn Backing>, ProviderError>;
    /// The record of emulated sync calls, for a provider that emulates them
    /// (memfd); `None` when syncs reach the kernel.
    fn sync_record(&self) -> Option<SyncRecord> {
        None
    }
    /// A new pool of slabs for one guest's small objects (memfd: see
    /// `slab.rs`); `None` when every buffer has an fd of its own.
    fn slab_pool(&self) -> Option<SlabPool> {
        None
    }
}

/// Takes ownership of a host dma-buf fd (a GPU, camera or codec buffer).
///
/// The size comes from `lseek(SEEK_END)` (the dma-buf core answers it with the
/// buffer size); it must be non-zero and a page multiple. A udmabuf gets one
/// `START|RW` first, as the udmabuf provider's own buffers do (its driver
/// refuses an END before any START).
pub fn import_dmabuf(fd: OwnedFd) -> Result<Box<dyn Backing>, ProviderError> {
    udmabuf::prime_if_udmabuf(&fd)?;
    Ok(Box::new(imported::import(fd, "imported")?))
}

/// Takes ownership of an fd the host hands over (`ctl export`, a shared
/// object): a kernel dma-buf is used as [`import_dmabuf`] does; any other
/// mappable fd (a memfd standing in for a device buffer) works the same way
/// but its syncs go to the recording emulation, as memfd objects' do.
pub fn import_host_fd(fd: OwnedFd) -> Result<Box<dyn Backing>, ProviderError> {
    udmabuf::prime_if_udmabuf(&fd)?;
    Ok(Box::new(imported::import_detect(fd, "imported")?))
}

/// Which provider the daemon should use (`--provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderChoice {
    /// udmabuf if the host has it, else dma-heap, else memfd.
    Auto,
    Memfd,
    Udmabuf,
    DmaHeap,
}

impl ProviderChoice {
    /// The spellings [`FromStr`] accepts, in this order.
    pub const NAMES: [&'static str; 4] = ["auto", "memfd", "udmabuf", "dma-heap"];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderChoice::Auto => "auto",
            ProviderChoice::Memfd => "memfd",
            ProviderChoice::Udmabuf => "udmabuf",
            ProviderChoice::DmaHeap => "dma-heap",
        }
    }
}

impl fmt::Display for ProviderChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider name other than `auto|memfd|udmabuf|dma-heap`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider {0:?} (expected auto, memfd, udmabuf or dma-heap)")]
pub struct UnknownProvider(pub String);

impl FromStr for ProviderChoice {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ProviderChoice::Auto),
            "memfd" => Ok(ProviderChoice::Memfd),
            "udmabuf" => Ok(ProviderChoice::Udmabuf),
            "dma-heap" => Ok(ProviderChoice::DmaHeap),
            other => Err(UnknownProvider(other.to_owned())),
        }
    }
}

/// Opens the chosen provider. `Auto` tries udmabuf, then dma-heap, then
/// memfd. `memfd_max_object_size` caps memfd buffers, and dma-heap buffers
/// too (the system heap has no per-buffer limit of its own); udmabuf takes
/// its cap from the kernel module (`size_limit_mb`).
pub fn open_provider(
    choice: ProviderChoice,
    memfd_max_object_size: u64,
) -> Result<Box<dyn Provider>, ProviderError> {
    match choice {
        ProviderChoice::Memfd => Ok(Box::new(MemfdProvider::new(memfd_max_object_size))),
        ProviderChoice::Udmabuf => Ok(Box::new(UdmabufProvider::open()?)),
        ProviderChoice::DmaHeap => Ok(Box::new(DmaHeapProvider::open(memfd_max_object_size)?)),
        ProviderChoice::Auto => {
            match UdmabufProvider::open() {
                Ok(p) => {
                    log::info!(
                        "provider: udmabuf ({UDMABUF_NODE}, max object size {} bytes)",
                        p.max_object_size()
                    );
                    return Ok(Box::new(p));
                }
                Err(e) => log_fallback("udmabuf", &e),
            }
            match DmaHeapProvider::open(memfd_max_object_size) {
                Ok(p) => {
                    log::info!(
                        "provider: dma-heap ({DMA_HEAP_SYSTEM_NODE}, max object size {} bytes)",
                        p.max_object_size()
                    );
                    return Ok(Box::new(p));
                }
                Err(e) => log_fallback("dma-heap", &e),
            }
            log::info!(
                "provider: memfd (syncs emulated, max object size {memfd_max_object_size} bytes)"
            );
            Ok(Box::new(MemfdProvider::new(memfd_max_object_size)))
        }
    }
}

fn log_fallback(what: &str, e: &ProviderError) {
    match e {
        ProviderError::MissingDevice { .. } => log::info!("provider: skipping {what}: {e}"),
        _ => log::warn!("provider: skipping {what}: {e}"),
    }
}

/// A zero-filled memfd of `size` bytes with `seals`, for other modules'
/// tests (guest RAM as a front-end seals it).
#[cfg(test)]
pub(crate) fn sealed_memfd_for_tests(size: u64, seals: rustix::fs::SealFlags) -> OwnedFd {
    #[allow(clippy::expect_used)]
    memfd::sealed_memfd(size, rustix::fs::MemfdFlags::CLOEXEC, seals).expect("sealed memfd")
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it touches no memory of
    // ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// What is wrong with a size [`ProviderError::BadSize`] refused, in the
/// terms of the rule it broke.
fn bad_size(size: u64, max: u64) -> String {
    let page = page_size();
    if size == 0 {
        format!("size 0: a buffer is at least one page ({page} bytes)")
    } else if !size.is_multiple_of(page) {
        format!("size {size} is not a page multiple ({page})")
    } else if size > max {
        format!("size {size} is above the largest allowed, {max} bytes")
    } else {
        format!("size {size} cannot be mapped by this process")
    }
}

/// Checks a buffer size: non-zero, a page multiple, at most `max`.
pub(crate) fn check_alloc_size(size: u64, max: u64) -> Result<usize, ProviderError> {
    let bad = ProviderError::BadSize { size, max };
    if size == 0 || size > max || !size.is_multiple_of(page_size()) {
        return Err(bad);
    }
    usize::try_from(size).map_err(|_| bad)
}

/// Checks that `offset..offset + len` lies within a buffer of `size` bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<(), ProviderError> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ProviderError::OutOfRange { offset, len, size }),
    }
}

/// True when `fd` is a kernel dma-buf (its anonymous inode is named
/// `dmabuf`, as `/proc/self/fd` shows it).
pub fn is_dmabuf_fd(fd: &impl std::os::fd::AsFd) -> bool {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    std::fs::read_link(link).is_ok_and(|target| {
        let t = target.to_string_lossy();
        t.starts_with("anon_inode:dmabuf") || t.starts_with("/dmabuf:")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_choice_parses_the_four_names() {
        for name in ProviderChoice::NAMES {
            let choice: ProviderChoice = name.parse().expect("known name");
            assert_eq!(choice.as_str(), name);
            assert_eq!(choice.to_string(), name);
        }
        assert_eq!("dma-heap".parse(), Ok(ProviderChoice::DmaHeap));
        assert_eq!(
            "dma_heap".parse::<ProviderChoice>(),
            Err(UnknownProvider("dma_heap".into()))
        );
    }

    #[test]
    fn open_provider_memfd_uses_the_given_cap() {
        let p = open_provider(ProviderChoice::Memfd, 1 << 20).expect("memfd");
        assert_eq!(p.kind(), ProviderKind::Memfd);
        assert_eq!(p.max_object_size(), 1 << 20);
        assert!(!p.makes_real_dmabufs());
        assert!(p.sync_record().is_some());
    }

    #[test]
    fn open_provider_auto_prefers_udmabuf_then_dma_heap_then_memfd() {
        let p = open_provider(ProviderChoice::Auto, 1 << 20).expect("auto never fails");
        let expected = if UdmabufProvider::open().is_ok() {
            ProviderKind::Udmabuf
        } else if DmaHeapProvider::open(1 << 20).is_ok() {
            ProviderKind::DmaHeap
        } else {
            ProviderKind::Memfd
        };
        assert_eq!(p.kind(), expected);
    }

    #[test]
    fn allocate_sizes_must_be_nonzero_page_multiples_within_the_cap() {
        let page = page_size();
        let max = 4 * page;
        assert!(check_alloc_size(page, max).is_ok());
        assert!(check_alloc_size(max, max).is_ok());
        for size in [0, 1, page + 1, max + page] {
            assert!(matches!(
                check_alloc_size(size, max),
                Err(ProviderError::BadSize { size: s, max: m }) if s == size && m == max
            ));
        }
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert!(check_range(0, 16, 16).is_ok());
        assert!(check_range(16, 0, 16).is_ok());
        assert!(check_range(17, 0, 16).is_err());
        assert!(check_range(8, 9, 16).is_err());
        assert!(matches!(
            check_range(u64::MAX, 2, 16),
            Err(ProviderError::OutOfRange {
                offset: u64::MAX,
                len: 2,
                size: 16
            })
        ));
    }
}
