// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host sync call (section 9): `DMA_BUF_IOCTL_SYNC` on a kernel dma-buf,
//! and its emulation for memfd buffers, which records every call.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Setter};
use virtio_dmabuf_protocol::sync_flags;

use super::ProviderError;

/// `struct dma_buf_sync` of `<linux/dma-buf.h>`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct DmaBufSync {
    flags: u64,
}

/// `DMA_BUF_IOCTL_SYNC` = `_IOW('b', 0, struct dma_buf_sync)` = 0x40086200.
const DMA_BUF_IOCTL_SYNC: Opcode = opcode::write::<DmaBufSync>(b'b', 0);

/// The bits the kernel accepts (`DMA_BUF_SYNC_VALID_FLAGS_MASK`).
const VALID_FLAGS: u64 = sync_flags::RW | sync_flags::END;

/// How many `EINTR`/`EAGAIN` answers in a row one call retries before giving
/// up, so a misbehaving exporter or a signal storm cannot spin the daemon
/// (and the guest request waiting on it) forever.
const MAX_RETRIES: u32 = 1000;

const SYNC_OP: &str = "DMA_BUF_IOCTL_SYNC";

/// One `DMA_BUF_IOCTL_SYNC` on a kernel dma-buf. `EINTR` and `EAGAIN` are
/// retried (section 9), at most `MAX_RETRIES` times; any other answer, or
/// the last `EINTR`/`EAGAIN`, is `ProviderError::Host`.
pub fn dma_buf_sync(fd: BorrowedFd<'_>, flags: u64) -> Result<(), ProviderError> {
    retry_sync(|| {
        // SAFETY: DMA_BUF_IOCTL_SYNC takes a pointer to a `struct dma_buf_sync`
        // (one u64) that the kernel only reads; `DmaBufSync` has that layout
        // and `Setter` passes a pointer to its own copy, live for the call.
        unsafe {
            ioctl(
                fd,
                Setter::<DMA_BUF_IOCTL_SYNC, _>::new(DmaBufSync { flags }),
            )
        }
    })
}

/// Runs `call` until it succeeds, fails with something other than
/// `EINTR`/`EAGAIN`, or has been retried [`MAX_RETRIES`] times.
fn retry_sync(mut call: impl FnMut() -> rustix::io::Result<()>) -> Result<(), ProviderError> {
    let mut retries = 0;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(e @ (Errno::INTR | Errno::AGAIN)) => {
                if retries == MAX_RETRIES {
                    return Err(ProviderError::host(SYNC_OP, e));
                }
                retries += 1;
                if e == Errno::AGAIN {
                    std::thread::yield_now();
                }
            }
            Err(e) => return Err(ProviderError::host(SYNC_OP, e)),
        }
    }
}

/// Checks sync flags as the kernel's `dma_buf_ioctl` does: only READ, WRITE
/// and END bits, and at least one of READ and WRITE. A refusal is the same
/// `EINVAL` the kernel answers.
pub fn validate_sync_flags(flags: u64) -> Result<(), ProviderError> {
    if flags & !VALID_FLAGS != 0 || flags & sync_flags::RW == 0 {
        return Err(ProviderError::Host {
            op: SYNC_OP,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    Ok(())
}

/// One emulated sync call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyncCall {
    /// Which buffer: the inode number of its memfd.
    pub buffer: u64,
    /// The `DMA_BUF_IOCTL_SYNC` flags.
    pub flags: u64,
}

#[derive(Debug, Default)]
struct RecordInner {
    calls: VecDeque<SyncCall>,
    total: u64,
}

/// The record of emulated sync calls, shared by a memfd provider and all its
/// buffers. It keeps the last [`SyncRecord::CAPACITY`] calls in order.
#[derive(Debug, Clone, Default)]
pub struct SyncRecord {
    inner: Arc<Mutex<RecordInner>>,
}

impl SyncRecord {
    /// How many calls are kept; older ones are dropped.
    pub const CAPACITY: usize = 65536;

    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, RecordInner> {
        // A panic elsewhere cannot leave the record inconsistent (push is a
        // single push_back/pop_front), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, call: SyncCall) {
        let mut inner = self.lock();
        if inner.calls.len() == Self::CAPACITY {
            inner.calls.pop_front();
        }
        inner.calls.push_back(call);
        inner.total += 1;
    }

    /// The kept calls, oldest first.
    pub fn calls(&self) -> Vec<SyncCall> {
        self.lock().calls.iter().copied().collect()
    }

    /// The kept calls made after the first `seen` calls ever recorded (pass
    /// an earlier [`SyncRecord::total`] to get what happened since).
    pub fn calls_since(&self, seen: u64) -> Vec<SyncCall> {
        let inner = self.lock();
        let first_kept = inner.total - inner.calls.len() as u64;
        let skip = seen.saturating_sub(first_kept);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        inner.calls.iter().skip(skip).copied().collect()
    }

    /// How many calls were ever recorded, including dropped ones.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// How many calls are kept.
    pub fn len(&self) -> usize {
        self.lock().calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().calls.is_empty()
    }
}

/// The memfd stand-in for `DMA_BUF_IOCTL_SYNC`: refuses what the kernel
/// refuses, orders memory as cache maintenance would, and records the call.
pub(crate) fn emulated_sync(
    record: &SyncRecord,
    buffer: u64,
    flags: u64,
) -> Result<(), ProviderError> {
    validate_sync_flags(flags)?;
    // CPU stores made before the call are ordered before everything after
    // it, as a real flush/invalidate would; memfd memory is coherent.
    fence(Ordering::SeqCst);
    record.push(SyncCall { buffer, flags });
    Ok(())
}

/// Test check: a sync call failed in `DMA_BUF_IOCTL_SYNC` with `errno`.
#[cfg(test)]
pub(crate) fn assert_sync_refused(err: &ProviderError, errno: i32) {
    assert!(
        matches!(
            err,
            ProviderError::Host {
                op: "DMA_BUF_IOCTL_SYNC",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.raw_os_error(), Some(errno));
}

/// Test check on a real dma-buf: the flags the kernel's `dma_buf_ioctl`
/// refuses are `EINVAL` from the kernel itself ([`dma_buf_sync`] does not
/// check them first), and the emulation's check agrees with it on both the
/// refused and the accepted ones.
#[cfg(test)]
pub(crate) fn assert_kernel_refuses_bad_flags(fd: BorrowedFd<'_>) {
    use sync_flags::{END, READ, RW, START, WRITE};
    for bad in [
        0,
        END,
        1 << 3,
        READ | 1 << 3,
        END | WRITE | 1 << 8,
        RW | 1 << 63,
    ] {
        let err = dma_buf_sync(fd, bad).expect_err("the kernel refuses these flags");
        assert_sync_refused(&err, libc::EINVAL);
        assert!(validate_sync_flags(bad).is_err(), "{bad:#x}");
    }
    for ok in [
        START | READ,
        END | READ,
        START | WRITE,
        END | WRITE,
        START | RW,
        END | RW,
    ] {
        dma_buf_sync(fd, ok).unwrap_or_else(|e| panic!("{ok:#x}: {e}"));
        assert!(validate_sync_flags(ok).is_ok(), "{ok:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};
    use std::os::fd::AsFd;
    use virtio_dmabuf_protocol::sync_flags::{END, READ, RW, START, WRITE};

    #[test]
    fn sync_ioctl_number_matches_the_contract() {
        assert_eq!(DMA_BUF_IOCTL_SYNC, 0x4008_6200);
    }

    #[test]
    fn real_sync_ioctl_on_memfd_reaches_kernel_and_is_enotty() {
        let fd = memfd_create("sync-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        let err = dma_buf_sync(fd.as_fd(), START | READ).expect_err("a memfd is no dma-buf");
        assert_sync_refused(&err, libc::ENOTTY);
    }

    #[test]
    fn sync_retries_eintr_and_eagain_a_bounded_number_of_times() {
        let mut calls = 0;
        let transient = retry_sync(|| {
            calls += 1;
            match calls {
                1 => Err(Errno::INTR),
                2 => Err(Errno::AGAIN),
                _ => Ok(()),
            }
        });
        assert!(transient.is_ok());
        assert_eq!(calls, 3);
        for errno in [Errno::INTR, Errno::AGAIN] {
            let mut calls = 0;
            let err = retry_sync(|| {
                calls += 1;
                Err(errno)
            })
            .expect_err("never succeeds");
            assert_eq!(calls, MAX_RETRIES + 1, "{errno:?}");
            assert_eq!(err.raw_os_error(), Some(errno.raw_os_error()));
        }
        let mut calls = 0;
        let err = retry_sync(|| {
            calls += 1;
            Err(Errno::IO)
        })
        .expect_err("EIO");
        assert_eq!((calls, err.raw_os_error()), (1, Some(libc::EIO)));
    }

    #[test]
    fn sync_flags_are_validated_like_the_kernel() {
        for ok in [
            START | READ,
            START | WRITE,
            START | RW,
            END | READ,
            END | WRITE,
            END | RW,
        ] {
            assert!(validate_sync_flags(ok).is_ok(), "{ok:#x}");
        }
        for bad in [0, END, 1 << 3, READ | 1 << 3, RW | 1 << 63] {
            let err = validate_sync_flags(bad).expect_err("invalid flags");
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{bad:#x}");
        }
    }

    #[test]
    fn sync_record_is_bounded_and_keeps_the_newest() {
        let record = SyncRecord::new();
        let n = SyncRecord::CAPACITY as u64 + 10;
        for i in 0..n {
            record.push(SyncCall {
                buffer: i,
                flags: READ,
            });
        }
        assert_eq!(record.len(), SyncRecord::CAPACITY);
        assert_eq!(record.total(), n);
        let calls = record.calls();
        assert_eq!(calls.first().map(|c| c.buffer), Some(10));
        assert_eq!(calls.last().map(|c| c.buffer), Some(n - 1));
        let since: Vec<u64> = record.calls_since(n - 2).iter().map(|c| c.buffer).collect();
        assert_eq!(since, [n - 2, n - 1]);
        // Asking for calls older than the kept window returns all kept ones.
        assert_eq!(record.calls_since(0).len(), SyncRecord::CAPACITY);
        assert!(record.calls_since(n).is_empty());
    }
}
