// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The udmabuf provider (section 10): memfds sealed with `F_SEAL_SHRINK`
//! turned into dma-bufs by `/dev/udmabuf`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Ioctl, IoctlOutput, Opcode};
use virtio_dmabuf_protocol::{sync_flags, ProviderKind};

use super::imported::{import, KernelDmabuf};
use super::memfd::sealed_memfd;
use super::sync::dma_buf_sync;
use super::{check_alloc_size, Backing, Provider, ProviderError};

/// The udmabuf device node.
pub const UDMABUF_NODE: &str = "/dev/udmabuf";

/// The udmabuf module's per-buffer limit when its `size_limit_mb` parameter
/// cannot be read: 64 MiB.
pub const UDMABUF_DEFAULT_SIZE_LIMIT: u64 = 64 << 20;

const SIZE_LIMIT_PARAM: &str = "/sys/module/udmabuf/parameters/size_limit_mb";

/// The udmabuf module's limit on `UDMABUF_CREATE_LIST` items when its
/// `list_limit` parameter cannot be read.
pub const UDMABUF_DEFAULT_LIST_LIMIT: u32 = 1024;

const LIST_LIMIT_PARAM: &str = "/sys/module/udmabuf/parameters/list_limit";

/// `UDMABUF_FLAGS_CLOEXEC`: the new dma-buf fd is close-on-exec.
const UDMABUF_FLAGS_CLOEXEC: u32 = 1;

/// `struct udmabuf_create` of `<linux/udmabuf.h>`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}

/// `struct udmabuf_create_list` without its flexible `list[]`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct UdmabufCreateListHeader {
    flags: u32,
    count: u32,
}

/// Size of one `struct udmabuf_create_item` {u32 memfd; u32 pad; u64 offset;
/// u64 size}.
const CREATE_ITEM_SIZE: usize = 24;

/// `UDMABUF_CREATE` = `_IOW('u', 0x42, struct udmabuf_create)` = 0x40187542.
const UDMABUF_CREATE: Opcode = opcode::write::<UdmabufCreate>(b'u', 0x42);
/// `UDMABUF_CREATE_LIST` = `_IOW('u', 0x43, struct udmabuf_create_list)` =
/// 0x40087543.
const UDMABUF_CREATE_LIST: Opcode = opcode::write::<UdmabufCreateListHeader>(b'u', 0x43);

/// An ioctl that reads `arg` and returns a new fd as its result (the udmabuf
/// ioctls).
struct ReturnsFd<'a, const OPCODE: Opcode> {
    arg: &'a [u8],
}

// SAFETY: used only with the udmabuf opcodes above, whose argument the kernel
// reads (never writes, hence IS_MUTATING = false) as the encoded struct in
// `arg`, and whose non-negative result is a new fd.
unsafe impl<const OPCODE: Opcode> Ioctl for ReturnsFd<'_, OPCODE> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        OPCODE
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.arg.as_ptr().cast_mut().cast()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Runs one fd-creating udmabuf ioctl, retrying `EINTR`.
fn create_fd<const OPCODE: Opcode>(
    dev: BorrowedFd<'_>,
    arg: &[u8],
    op: &'static str,
) -> Result<OwnedFd, ProviderError> {
    loop {
        // SAFETY: `arg` holds the struct this opcode expects (built by the
        // encoders below) and stays borrowed for the whole call; the kernel
        // only reads it.
        match unsafe { ioctl(dev, ReturnsFd::<OPCODE> { arg }) } {
            Ok(fd) if fd >= 0 => {
                // SAFETY: on success the udmabuf ioctls return a new fd that
                // nothing else owns; it is wrapped exactly once, here.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Ok(_) => return Err(ProviderError::host(op, Errno::INVAL)),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(ProviderError::host(op, e)),
        }
    }
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    // A live fd is never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

fn encode_create(memfd: BorrowedFd<'_>, offset: u64, size: u64) -> Vec<u8> {
    let mut arg = Vec::with_capacity(std::mem::size_of::<UdmabufCreate>());
    arg.extend_from_slice(&fd_number(memfd).to_ne_bytes());
    arg.extend_from_slice(&UDMABUF_FLAGS_CLOEXEC.to_ne_bytes());
    arg.extend_from_slice(&offset.to_ne_bytes());
    arg.extend_from_slice(&size.to_ne_bytes());
    arg
}

fn encode_create_list(items: &[(BorrowedFd<'_>, u64, u64)]) -> Result<Vec<u8>, ProviderError> {
    let count = u32::try_from(items.len())
        .map_err(|_| ProviderError::host("UDMABUF_CREATE_LIST", Errno::INVAL))?;
    let mut arg = Vec::with_capacity(
        std::mem::size_of::<UdmabufCreateListHeader>() + items.len() * CREATE_ITEM_SIZE,
    );
    arg.extend_from_slice(&UDMABUF_FLAGS_CLOEXEC.to_ne_bytes());
    arg.extend_from_slice(&count.to_ne_bytes());
    for &(memfd, offset, size) in items {
        arg.extend_from_slice(&fd_number(memfd).to_ne_bytes());
        arg.extend_from_slice(&0u32.to_ne_bytes());
        arg.extend_from_slice(&offset.to_ne_bytes());
        arg.extend_from_slice(&size.to_ne_bytes());
    }
    Ok(arg)
}

/// `UDMABUF_CREATE`: a dma-buf over `size` bytes of `memfd` at `offset`.
/// The memfd must carry `F_SEAL_SHRINK` and not `F_SEAL_WRITE`; offset and
/// size must be page multiples (the kernel checks).
pub fn udmabuf_create(
    dev: BorrowedFd<'_>,
    memfd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
) -> Result<OwnedFd, ProviderError> {
    create_fd::<UDMABUF_CREATE>(dev, &encode_create(memfd, offset, size), "UDMABUF_CREATE")
}

/// `UDMABUF_CREATE_LIST`: one dma-buf over the (memfd, offset, size) items in
/// order (guest-RAM-backed buffers). The rules of [`udmabuf_create`] apply to
/// each item; the kernel also limits the item count (`list_limit`) and the
/// total size (`size_limit_mb`).
pub fn udmabuf_from_list(
    dev: BorrowedFd<'_>,
    items: &[(BorrowedFd<'_>, u64, u64)],
) -> Result<OwnedFd, ProviderError> {
    let arg = encode_create_list(items)?;
    create_fd::<UDMABUF_CREATE_LIST>(dev, &arg, "UDMABUF_CREATE_LIST")
}

/// Makes a new udmabuf ready for every sync the daemon issues.
///
/// udmabuf's `end_cpu_access` is `EINVAL` until a `begin_cpu_access` has
/// built the driver's sg table (`end_cpu_udmabuf` in udmabuf.c), so the
/// first END the daemon sends before any START (the attach-time mapping,
/// a fresh `MAP`, section 9) would fail. One `START|RW` right after
/// creation builds the table, mapped BIDIRECTIONAL so later syncs of any
/// direction go through it; that first START does no cache maintenance of
/// its own. It is not a guest's sync, so it is not in the daemon's record.
fn prime(dmabuf: &OwnedFd) -> Result<(), ProviderError> {
    dma_buf_sync(dmabuf.as_fd(), sync_flags::START | sync_flags::RW)
}

/// True when `fd` is a dma-buf the udmabuf driver exported (`exp_name` in
/// its `/proc/self/fdinfo` entry).
pub(crate) fn is_udmabuf(fd: BorrowedFd<'_>) -> bool {
    let info = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    std::fs::read_to_string(info).is_ok_and(|text| {
        text.lines().any(|line| {
            line.split_once(':')
                .is_some_and(|(key, value)| key == "exp_name" && value.trim() == "udmabuf")
        })
    })
}

/// [`prime`] for a udmabuf made by someone else and handed to the daemon (a
/// host export, a shared object): one its maker never synced refuses the
/// daemon's first END the same way.
pub(crate) fn prime_if_udmabuf(fd: &OwnedFd) -> Result<(), ProviderError> {
    if is_udmabuf(fd.as_fd()) {
        prime(fd)?;
    }
    Ok(())
}

/// The module's per-buffer limit: `size_limit_mb` if readable, else 64 MiB.
fn udmabuf_size_limit() -> u64 {
    let Ok(text) = std::fs::read_to_string(SIZE_LIMIT_PARAM) else {
        return UDMABUF_DEFAULT_SIZE_LIMIT;
    };
    match text
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|mb| mb.checked_mul(1 << 20))
    {
        Some(limit) if limit > 0 => limit,
        _ => {
            log::warn!("{SIZE_LIMIT_PARAM} reads {text:?}; assuming 64 MiB");
            UDMABUF_DEFAULT_SIZE_LIMIT
        }
    }
}

/// The module's item limit of `UDMABUF_CREATE_LIST`: `list_limit` if
/// readable, else 1024.
fn udmabuf_list_limit() -> u32 {
    std::fs::read_to_string(LIST_LIMIT_PARAM)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .unwrap_or(UDMABUF_DEFAULT_LIST_LIMIT)
}

/// Opens a device node read-write; a missing node is `MissingDevice`.
pub(crate) fn open_node(
    node: &'static str,
    what: &'static str,
    op: &'static str,
) -> Result<OwnedFd, ProviderError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)
    {
        Ok(file) => Ok(file.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ProviderError::MissingDevice { what, node })
        }
        Err(source) => Err(ProviderError::Host { op, source }),
    }
}

/// Hands out udmabuf dma-bufs over fresh sealed memfds.
#[derive(Debug)]
pub struct UdmabufProvider {
    dev: OwnedFd,
    max_object_size: u64,
    list_limit: u32,
}

impl UdmabufProvider {
    /// Opens `/dev/udmabuf`.
    pub fn open() -> Result<Self, ProviderError> {
        let dev = open_node(UDMABUF_NODE, "udmabuf", "open /dev/udmabuf")?;
        Ok(UdmabufProvider {
            dev,
            max_object_size: udmabuf_size_limit(),
            list_limit: udmabuf_list_limit(),
        })
    }

    /// A provider over `dev` as if it were `/dev/udmabuf` (tests of the
    /// callers' fallbacks, where any other fd answers `ENOTTY`).
    #[cfg(test)]
    pub(crate) fn with_device(dev: OwnedFd, max_object_size: u64, list_limit: u32) -> Self {
        UdmabufProvider {
            dev,
            max_object_size,
            list_limit,
        }
    }

    /// Most items one `UDMABUF_CREATE_LIST` may carry (`list_limit`).
    pub fn list_limit(&self) -> u32 {
        self.list_limit
    }

    /// The open `/dev/udmabuf`, for [`udmabuf_from_list`].
    pub fn device(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }

    /// [`udmabuf_from_list`] wrapped as a buffer (size from the dma-buf).
    pub fn from_list(
        &self,
        items: &[(BorrowedFd<'_>, u64, u64)],
    ) -> Result<KernelDmabuf, ProviderError> {
        let fd = udmabuf_from_list(self.dev.as_fd(), items)?;
        prime(&fd)?;
        import(fd, "udmabuf")
    }
}

impl Provider for UdmabufProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Udmabuf
    }

    fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    fn makes_real_dmabufs(&self) -> bool {
        true
    }

    fn allocate(&self, size: u64) -> Result<Box<dyn Backing>, ProviderError> {
        check_alloc_size(size, self.max_object_size)?;
        // udmabuf wants F_SEAL_SHRINK (pages cannot vanish under the dma-buf)
        // and refuses F_SEAL_WRITE. The dma-buf holds the pages, so the memfd
        // is closed when this function returns.
        let memfd = sealed_memfd(size, MemfdFlags::CLOEXEC, SealFlags::SHRINK)?;
        let fd = udmabuf_create(self.dev.as_fd(), memfd.as_fd(), 0, size)?;
        prime(&fd)?;
        Ok(Box::new(KernelDmabuf::new(fd, size, "udmabuf")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::page_size;
    use rustix::fs::{ftruncate, memfd_create};
    use virtio_dmabuf_protocol::sync_flags::{END, RW, START};

    #[test]
    fn udmabuf_ioctl_numbers_match_the_contract() {
        assert_eq!(UDMABUF_CREATE, 0x4018_7542);
        assert_eq!(UDMABUF_CREATE_LIST, 0x4008_7543);
        assert_eq!(std::mem::size_of::<UdmabufCreate>(), 24);
    }

    #[test]
    fn udmabuf_create_list_is_encoded_as_the_kernel_struct() {
        let a = memfd_create("a", MemfdFlags::CLOEXEC).expect("memfd");
        let b = memfd_create("b", MemfdFlags::CLOEXEC).expect("memfd");
        let arg =
            encode_create_list(&[(a.as_fd(), 0, 4096), (b.as_fd(), 8192, 12288)]).expect("encode");
        assert_eq!(arg.len(), 8 + 2 * CREATE_ITEM_SIZE);
        let u32_at = |i: usize| u32::from_ne_bytes(arg[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(arg[i..i + 8].try_into().expect("8 bytes"));
        assert_eq!(u32_at(0), UDMABUF_FLAGS_CLOEXEC);
        assert_eq!(u32_at(4), 2);
        assert_eq!(u32_at(8), fd_number(a.as_fd()));
        assert_eq!(u32_at(12), 0);
        assert_eq!(u64_at(16), 0);
        assert_eq!(u64_at(24), 4096);
        assert_eq!(u32_at(32), fd_number(b.as_fd()));
        assert_eq!(u64_at(40), 8192);
        assert_eq!(u64_at(48), 12288);
    }

    #[test]
    fn udmabuf_ioctls_reach_the_kernel() {
        // Any fd that is not /dev/udmabuf refuses them with ENOTTY, which
        // shows the calls are well formed up to the driver.
        let not_udmabuf = memfd_create("not-udmabuf", MemfdFlags::CLOEXEC).expect("memfd");
        let memfd = sealed_memfd(4096, MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        let err = udmabuf_create(not_udmabuf.as_fd(), memfd.as_fd(), 0, 4096).expect_err("ENOTTY");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let err = udmabuf_from_list(not_udmabuf.as_fd(), &[(memfd.as_fd(), 0, 4096)])
            .expect_err("ENOTTY");
        assert!(matches!(
            err,
            ProviderError::Host {
                op: "UDMABUF_CREATE_LIST",
                ..
            }
        ));
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }

    #[test]
    fn missing_udmabuf_names_the_device_node() {
        match UdmabufProvider::open() {
            Err(err @ ProviderError::MissingDevice { .. }) => {
                assert!(!std::path::Path::new(UDMABUF_NODE).exists());
                assert!(matches!(
                    err,
                    ProviderError::MissingDevice {
                        what: "udmabuf",
                        node: "/dev/udmabuf"
                    }
                ));
                assert!(err.to_string().contains("/dev/udmabuf"), "{err}");
                println!("udmabuf real path skipped: {UDMABUF_NODE} does not exist on this host");
            }
            Err(other) => panic!("{UDMABUF_NODE} exists but cannot be used: {other}"),
            Ok(p) => exercise_real_udmabuf(&p),
        }
    }

    /// `/dev/udmabuf`, or `None` with the reason printed where the host
    /// has none.
    fn real_udmabuf(test: &str) -> Option<UdmabufProvider> {
        match UdmabufProvider::open() {
            Ok(p) => Some(p),
            Err(ProviderError::MissingDevice { node, .. }) => {
                println!("{test} skipped: {node} does not exist on this host");
                None
            }
            Err(e) => panic!("{UDMABUF_NODE} exists but cannot be used: {e}"),
        }
    }

    /// A udmabuf straight from `UDMABUF_CREATE`, without the provider's
    /// priming START.
    fn raw_udmabuf(p: &UdmabufProvider, size: u64) -> OwnedFd {
        let memfd = sealed_memfd(size, MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        udmabuf_create(p.device(), memfd.as_fd(), 0, size).expect("UDMABUF_CREATE")
    }

    #[test]
    fn udmabuf_kernel_refuses_bad_sync_flags_with_einval() {
        let Some(p) = real_udmabuf("udmabuf bad sync flags") else {
            return;
        };
        let fd = raw_udmabuf(&p, page_size());
        crate::provider::sync::assert_kernel_refuses_bad_flags(fd.as_fd());
    }

    #[test]
    fn udmabuf_end_without_start_is_einval_until_a_first_start() {
        let Some(p) = real_udmabuf("udmabuf END without START") else {
            return;
        };
        // end_cpu_udmabuf answers EINVAL while the driver has no sg table;
        // the first begin_cpu_udmabuf builds it.
        let fd = raw_udmabuf(&p, page_size());
        let err = dma_buf_sync(fd.as_fd(), END | RW).expect_err("no sg table yet");
        crate::provider::sync::assert_sync_refused(&err, libc::EINVAL);
        dma_buf_sync(fd.as_fd(), START | RW).expect("the first START builds it");
        dma_buf_sync(fd.as_fd(), END | RW).expect("END after START");
        dma_buf_sync(fd.as_fd(), END | RW).expect("a second END without START");
        println!("udmabuf: END without START is EINVAL on a fresh buffer, OK after any START");
    }

    #[test]
    fn a_udmabuf_handed_over_is_primed_too() {
        let Some(p) = real_udmabuf("udmabuf import priming") else {
            return;
        };
        let fd = raw_udmabuf(&p, page_size());
        assert!(is_udmabuf(fd.as_fd()), "fdinfo names the exporter");
        let b = crate::provider::import_host_fd(fd).expect("import");
        assert!(b.is_real_dmabuf());
        b.sync(END | RW)
            .expect("END before any START of the daemon's");
        let other =
            sealed_memfd(page_size(), MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        assert!(!is_udmabuf(other.as_fd()));
    }

    #[test]
    fn udmabuf_buffers_are_primed_so_an_end_may_come_first() {
        let Some(p) = real_udmabuf("udmabuf priming") else {
            return;
        };
        let b = p.allocate(page_size()).expect("allocate");
        b.sync(END | RW)
            .expect("END before any START of the daemon's");
        let m =
            sealed_memfd(2 * page_size(), MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        let list = p
            .from_list(&[(m.as_fd(), page_size(), page_size())])
            .expect("UDMABUF_CREATE_LIST");
        list.sync(END | RW).expect("END first on a listed udmabuf");
    }

    /// The real path, run where the host has `/dev/udmabuf`.
    fn exercise_real_udmabuf(p: &UdmabufProvider) {
        let page = page_size();
        assert_eq!(p.kind(), ProviderKind::Udmabuf);
        assert!(p.makes_real_dmabufs());
        assert!(p.max_object_size() >= page);
        let b = p.allocate(4 * page).expect("allocate");
        assert!(b.is_real_dmabuf());
        assert_eq!(b.size(), 4 * page);
        let mut all = vec![0xa5u8; (4 * page) as usize];
        b.sync(START | RW).expect("sync start");
        b.read_at(0, &mut all).expect("read");
        assert!(all.iter().all(|&x| x == 0), "zero-filled");
        b.write_at(page - 2, b"udma").expect("write");
        b.sync(END | RW).expect("sync end");
        b.sync(START | RW).expect("sync start");
        let mut out = [0u8; 4];
        b.read_at(page - 2, &mut out).expect("read");
        assert_eq!(&out, b"udma");
        b.sync(END | RW).expect("sync end");
        assert!(matches!(
            p.allocate(p.max_object_size() + page),
            Err(ProviderError::BadSize { .. })
        ));

        // Two memfds glued into one dma-buf, as for guest RAM.
        let m1 = sealed_memfd(2 * page, MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        let m2 = sealed_memfd(2 * page, MemfdFlags::CLOEXEC, SealFlags::SHRINK).expect("memfd");
        rustix::io::pwrite(&m1, b"one", page).expect("pwrite");
        rustix::io::pwrite(&m2, b"two", 0).expect("pwrite");
        let list = p
            .from_list(&[(m1.as_fd(), page, page), (m2.as_fd(), 0, page)])
            .expect("UDMABUF_CREATE_LIST");
        assert_eq!(list.size(), 2 * page);
        let mut three = [0u8; 3];
        list.read_at(0, &mut three).expect("read");
        assert_eq!(&three, b"one");
        list.read_at(page, &mut three).expect("read");
        assert_eq!(&three, b"two");

        // udmabuf refuses a memfd without F_SEAL_SHRINK.
        let unsealed = memfd_create("unsealed", MemfdFlags::CLOEXEC).expect("memfd");
        ftruncate(&unsealed, page).expect("ftruncate");
        assert!(udmabuf_create(p.device(), unsealed.as_fd(), 0, page).is_err());
    }
}
