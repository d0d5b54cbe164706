// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vgem fence source: a fence attached to a small vgem buffer, shared
//! through its dma-buf and exported as a `sync_file` (the DRM ioctls of
//! `<drm/drm.h>` and `<drm/vgem_drm.h>`).

use super::*;

/// `struct drm_version` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug)]
pub(super) struct DrmVersion {
    version_major: i32,
    version_minor: i32,
    version_patchlevel: i32,
    name_len: usize,
    name: *mut u8,
    date_len: usize,
    date: *mut u8,
    desc_len: usize,
    desc: *mut u8,
}

/// `struct drm_mode_create_dumb` of `<drm/drm_mode.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct DrmModeCreateDumb {
    height: u32,
    width: u32,
    bpp: u32,
    flags: u32,
    handle: u32,
    pitch: u32,
    size: u64,
}

/// `struct drm_prime_handle` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct DrmPrimeHandle {
    handle: u32,
    flags: u32,
    fd: i32,
}

/// `struct drm_gem_close` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct DrmGemClose {
    handle: u32,
    pad: u32,
}

/// `struct drm_vgem_fence_attach` of `<drm/vgem_drm.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct VgemFenceAttach {
    handle: u32,
    flags: u32,
    out_fence: u32,
    pad: u32,
}

/// `struct drm_vgem_fence_signal` of `<drm/vgem_drm.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct VgemFenceSignal {
    fence: u32,
    flags: u32,
}

pub(super) const DRM_IOCTL_VERSION: Opcode = opcode::read_write::<DrmVersion>(b'd', 0x00);
pub(super) const DRM_IOCTL_GEM_CLOSE: Opcode = opcode::write::<DrmGemClose>(b'd', 0x09);
pub(super) const DRM_IOCTL_PRIME_HANDLE_TO_FD: Opcode =
    opcode::read_write::<DrmPrimeHandle>(b'd', 0x2d);
pub(super) const DRM_IOCTL_MODE_CREATE_DUMB: Opcode =
    opcode::read_write::<DrmModeCreateDumb>(b'd', 0xB2);
/// `DRM_COMMAND_BASE + DRM_VGEM_FENCE_ATTACH` (0x40 + 0x1).
pub(super) const DRM_IOCTL_VGEM_FENCE_ATTACH: Opcode =
    opcode::read_write::<VgemFenceAttach>(b'd', 0x41);
/// `DRM_COMMAND_BASE + DRM_VGEM_FENCE_SIGNAL` (0x40 + 0x2).
pub(super) const DRM_IOCTL_VGEM_FENCE_SIGNAL: Opcode = opcode::write::<VgemFenceSignal>(b'd', 0x42);
pub(super) const VGEM_FENCE_WRITE: u32 = 0x1;

/// The driver name of a DRM node (`DRM_IOCTL_VERSION`), at most 63 bytes.
pub(super) fn drm_driver_name(card: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
    let mut name = [0u8; 64];
    let mut version = DrmVersion {
        version_major: 0,
        version_minor: 0,
        version_patchlevel: 0,
        name_len: name.len() - 1,
        name: name.as_mut_ptr(),
        date_len: 0,
        date: std::ptr::null_mut(),
        desc_len: 0,
        desc: std::ptr::null_mut(),
    };
    // SAFETY: DRM_IOCTL_VERSION reads and writes one `struct drm_version`,
    // whose layout `version` has; the kernel writes at most `name_len` (63)
    // bytes to `name`, which points into the 64-byte `name` above, and
    // nothing to `date`/`desc`, whose lengths are 0. Both outlive the call.
    retrying(|| unsafe { ioctl(card, Updater::<DRM_IOCTL_VERSION, _>::new(&mut version)) })?;
    let len = version.name_len.min(name.len() - 1);
    Ok(name[..len].to_vec())
}

/// The first `/dev/dri/card*` driven by vgem, or why there is none.
pub fn find_vgem_card() -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(DRI_DIR).map_err(|e| format!("{DRI_DIR}: {e}"))?;
    let mut cards: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("card"))
        })
        .collect();
    cards.sort();
    let mut seen = Vec::new();
    for path in cards {
        match open_rw(&path, "open a DRM card") {
            Ok(f) => match drm_driver_name(f.as_fd()) {
                Ok(name) if name == b"vgem" => return Ok(path),
                Ok(name) => seen.push(format!(
                    "{} is {}",
                    path.display(),
                    String::from_utf8_lossy(&name)
                )),
                Err(e) => seen.push(format!("{}: DRM_IOCTL_VERSION: {e}", path.display())),
            },
            Err(e) => seen.push(format!("{}: {e}", path.display())),
        }
    }
    if seen.is_empty() {
        Err(format!("no {DRI_DIR}/card* node"))
    } else {
        Err(format!("no vgem card ({})", seen.join(", ")))
    }
}

/// Fences made on one open file of the card before new ones go to a fresh
/// file: vgem keeps a slot for every fence a file ever made until the file
/// closes, so a file is retired (closed once its fences are signalled).
pub(super) const FENCES_PER_FILE: u64 = 1 << 16;

/// Free scratch buffers kept per file; more are closed.
pub(super) const FREE_SCRATCH: usize = 64;

/// One open file of the vgem card: its fences and scratch buffers.
#[derive(Debug)]
pub(super) struct VgemFile {
    pub(super) card: File,
    /// Scratch buffers with no pending fence.
    pub(super) free: Vec<u32>,
    /// Fences made on this file and not yet signalled by us.
    pub(super) pending: usize,
    pub(super) made: u64,
}

impl VgemFile {
    pub(super) fn open(node: &Path) -> Result<VgemFile, ProviderError> {
        Ok(VgemFile {
            card: open_rw(node, "open the vgem card")?,
            free: Vec::new(),
            pending: 0,
            made: 0,
        })
    }

    /// A one-page dumb buffer.
    pub(super) fn create_scratch(&self) -> Result<u32, ProviderError> {
        let mut dumb = DrmModeCreateDumb {
            height: 1,
            width: 1024,
            bpp: 32,
            ..DrmModeCreateDumb::default()
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_MODE_CREATE_DUMB reads and writes one `struct
            // drm_mode_create_dumb` (no pointers), whose layout `dumb` has;
            // `dumb` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_MODE_CREATE_DUMB, _>::new(&mut dumb),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_MODE_CREATE_DUMB", e))?;
        Ok(dumb.handle)
    }

    pub(super) fn close_scratch(&self, handle: u32) {
        let arg = DrmGemClose { handle, pad: 0 };
        // SAFETY: DRM_IOCTL_GEM_CLOSE reads one `struct drm_gem_close` (no
        // pointers); `Setter` passes a pointer to its own copy, live for
        // the call.
        let r =
            retrying(|| unsafe { ioctl(&self.card, Setter::<DRM_IOCTL_GEM_CLOSE, _>::new(arg)) });
        if let Err(e) = r {
            log::warn!("host fences: closing vgem scratch buffer {handle}: {e}");
        }
    }

    /// A dma-buf of a scratch buffer (`DRM_CLOEXEC`).
    pub(super) fn prime(&self, handle: u32) -> Result<OwnedFd, ProviderError> {
        let mut prime = DrmPrimeHandle {
            handle,
            flags: libc::O_CLOEXEC as u32,
            fd: -1,
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_PRIME_HANDLE_TO_FD reads and writes one
            // `struct drm_prime_handle` (no pointers), whose layout `prime`
            // has; `prime` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_PRIME_HANDLE_TO_FD, _>::new(&mut prime),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_PRIME_HANDLE_TO_FD", e))?;
        if prime.fd < 0 {
            return Err(ProviderError::host(
                "DRM_IOCTL_PRIME_HANDLE_TO_FD",
                Errno::INVAL,
            ));
        }
        // SAFETY: on success the kernel stored a new fd in `prime.fd` that
        // nothing else owns; it is wrapped exactly once, here.
        Ok(unsafe { OwnedFd::from_raw_fd(prime.fd) })
    }

    /// A fence on buffer `handle` (a WRITE fence with `write`, else READ):
    /// its vgem id.
    pub(super) fn attach(&self, handle: u32, write: bool) -> Result<u32, ProviderError> {
        let mut arg = VgemFenceAttach {
            handle,
            flags: if write { VGEM_FENCE_WRITE } else { 0 },
            out_fence: 0,
            pad: 0,
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_VGEM_FENCE_ATTACH reads and writes one
            // `struct drm_vgem_fence_attach` (no pointers), whose layout
            // `arg` has; `arg` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_VGEM_FENCE_ATTACH, _>::new(&mut arg),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_VGEM_FENCE_ATTACH", e))?;
        Ok(arg.out_fence)
    }

    /// Signals vgem fence `fence`: true when vgem had already signalled it
    /// itself (its own timeout).
    pub(super) fn signal(&self, fence: u32) -> Result<bool, ProviderError> {
        let arg = VgemFenceSignal { fence, flags: 0 };
        let r = retrying(|| {
            // SAFETY: DRM_IOCTL_VGEM_FENCE_SIGNAL reads one `struct
            // drm_vgem_fence_signal` (no pointers); `Setter` passes a
            // pointer to its own copy, live for the call.
            unsafe {
                ioctl(
                    &self.card,
                    Setter::<DRM_IOCTL_VGEM_FENCE_SIGNAL, _>::new(arg),
                )
            }
        });
        match r {
            Ok(()) => Ok(false),
            // vgem signals it anyway, and says it had timed out.
            Err(Errno::TIMEDOUT) => Ok(true),
            Err(e) => Err(ProviderError::host("DRM_IOCTL_VGEM_FENCE_SIGNAL", e)),
        }
    }

    /// Takes a free scratch buffer or makes one.
    pub(super) fn take_scratch(&mut self) -> Result<u32, ProviderError> {
        match self.free.pop() {
            Some(h) => Ok(h),
            None => self.create_scratch(),
        }
    }

    pub(super) fn give_back(&mut self, handle: u32) {
        if self.free.len() < FREE_SCRATCH {
            self.free.push(handle);
        } else {
            self.close_scratch(handle);
        }
    }

    /// A new vgem fence, alone on a scratch buffer, as a sync_file:
    /// `(handle, fence id, sync_file)`.
    pub(super) fn make_fence(&mut self) -> Result<(u32, u32, SyncFile), ProviderError> {
        let handle = self.take_scratch()?;
        let fence = match self.attach(handle, true) {
            Ok(f) => f,
            Err(e) => {
                // Not reused: something on it is still pending.
                self.close_scratch(handle);
                return Err(e);
            }
        };
        self.pending += 1;
        self.made += 1;
        let sync = self
            .prime(handle)
            .and_then(|dmabuf| export_sync_file(dmabuf.as_fd(), HostAccess::Read));
        match sync {
            Ok(sync) => Ok((handle, fence, sync)),
            Err(e) => {
                self.finish(handle, fence);
                Err(e)
            }
        }
    }

    /// Signals a fence of this file and frees its scratch buffer.
    pub(super) fn finish(&mut self, handle: u32, fence: u32) -> bool {
        let expired = match self.signal(fence) {
            Ok(expired) => expired,
            Err(e) => {
                log::warn!("host fences: signalling vgem fence {fence}: {e}");
                false
            }
        };
        self.pending = self.pending.saturating_sub(1);
        self.give_back(handle);
        expired
    }
}

impl Drop for VgemFile {
    fn drop(&mut self) {
        for h in std::mem::take(&mut self.free) {
            self.close_scratch(h);
        }
    }
}

/// The vgem source: the card's open files, the newest one taking new
/// fences.
#[derive(Debug)]
pub(super) struct Vgem {
    pub(super) node: PathBuf,
    pub(super) files: BTreeMap<u64, VgemFile>,
    pub(super) current: u64,
}

impl Vgem {
    pub(super) fn open(node: &Path) -> Result<Vgem, ProviderError> {
        let mut files = BTreeMap::new();
        files.insert(0, VgemFile::open(node)?);
        Ok(Vgem {
            node: node.to_path_buf(),
            files,
            current: 0,
        })
    }

    pub(super) fn self_test(&mut self) -> Result<(), ProviderError> {
        let file = self
            .files
            .get_mut(&self.current)
            .ok_or_else(|| ProviderError::Unsuitable("no vgem file".into()))?;
        let target = file.take_scratch()?;
        let result = (|| {
            let dmabuf = file.prime(target)?;
            let (handle, fence, sync) = file.make_fence()?;
            let imported = import_sync_file(dmabuf.as_fd(), sync.fd(), true);
            let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read)
                .and_then(|s| s.is_signalled().map(|signalled| !signalled));
            file.finish(handle, fence);
            imported?;
            if !seen? {
                return Err(ProviderError::Unsuitable(
                    "an imported vgem fence was not seen in the buffer's reservation".into(),
                ));
            }
            let cleared = export_sync_file(dmabuf.as_fd(), HostAccess::Write)?.is_signalled()?;
            if !cleared {
                return Err(ProviderError::Unsuitable(
                    "a signalled vgem fence still blocks its buffer".into(),
                ));
            }
            Ok(())
        })();
        file.give_back(target);
        result
    }

    pub(super) fn install(
        &mut self,
        dmabuf: BorrowedFd<'_>,
        write: bool,
    ) -> Result<Installed, ProviderError> {
        self.rotate();
        let id = self.current;
        let file = self
            .files
            .get_mut(&id)
            .ok_or_else(|| ProviderError::Unsuitable("no vgem file".into()))?;
        let (handle, fence, sync) = file.make_fence()?;
        if let Err(e) = import_sync_file(dmabuf, sync.fd(), write) {
            file.finish(handle, fence);
            return Err(e);
        }
        Ok(Installed::Vgem {
            file: id,
            handle,
            fence,
        })
    }

    /// Opens a fresh file once the current one made its share of fences;
    /// the old one closes when its last fence is signalled.
    pub(super) fn rotate(&mut self) {
        let full = self
            .files
            .get(&self.current)
            .is_none_or(|f| f.made >= FENCES_PER_FILE);
        if !full {
            return;
        }
        match VgemFile::open(&self.node) {
            Ok(f) => {
                let id = self.current + 1;
                self.files.insert(id, f);
                let old = self.current;
                self.current = id;
                self.close_if_idle(old);
            }
            Err(e) => log::warn!("host fences: opening a fresh vgem file: {e}"),
        }
    }

    pub(super) fn close_if_idle(&mut self, id: u64) {
        if id != self.current && self.files.get(&id).is_some_and(|f| f.pending == 0) {
            self.files.remove(&id);
        }
    }

    pub(super) fn signal(
        &mut self,
        file: u64,
        handle: u32,
        fence: u32,
    ) -> Result<bool, ProviderError> {
        let f = self
            .files
            .get_mut(&file)
            .ok_or_else(|| ProviderError::Unsuitable(format!("vgem file {file} is gone")))?;
        let expired = f.finish(handle, fence);
        self.close_if_idle(file);
        Ok(expired)
    }
}

/// A GPU buffer for tests: a vgem dumb buffer of its own, its dma-buf, and
/// vgem fences attached to it directly, as a GPU driver's job would.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestGpuBuffer {
    file: VgemFile,
    handle: u32,
    pub dmabuf: OwnedFd,
}

#[cfg(test)]
impl TestGpuBuffer {
    /// A one-page buffer, or why there is no vgem card.
    pub(crate) fn new() -> Result<TestGpuBuffer, String> {
        let path = find_vgem_card()?;
        let file = VgemFile::open(&path).map_err(|e| e.to_string())?;
        let handle = file.create_scratch().map_err(|e| e.to_string())?;
        let dmabuf = file.prime(handle).map_err(|e| e.to_string())?;
        Ok(TestGpuBuffer {
            file,
            handle,
            dmabuf,
        })
    }

    /// A host job's fence on the buffer: a vgem fence on a scratch buffer
    /// of the same file, imported into this one's reservation (attaching
    /// to the buffer itself is `EBUSY` while a conflicting fence, a
    /// guest's among them, is pending there).
    pub(crate) fn fence(&self, write: bool) -> u32 {
        let scratch = self.file.create_scratch().expect("scratch buffer");
        let fence = self
            .file
            .attach(scratch, true)
            .expect("DRM_IOCTL_VGEM_FENCE_ATTACH");
        let prime = self.file.prime(scratch).expect("prime");
        let sync = export_sync_file(prime.as_fd(), HostAccess::Read).expect("export");
        import_sync_file(self.dmabuf.as_fd(), sync.fd(), write).expect("import");
        fence
    }

    /// `DRM_IOCTL_VGEM_FENCE_ATTACH` on the buffer itself.
    pub(crate) fn direct_fence(&self, write: bool) -> u32 {
        self.file
            .attach(self.handle, write)
            .expect("DRM_IOCTL_VGEM_FENCE_ATTACH")
    }

    /// `DRM_IOCTL_VGEM_FENCE_SIGNAL`.
    pub(crate) fn signal(&self, fence: u32) {
        let expired = self
            .file
            .signal(fence)
            .expect("DRM_IOCTL_VGEM_FENCE_SIGNAL");
        assert!(!expired, "vgem timed fence {fence} out itself");
    }
}
