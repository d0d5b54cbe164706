// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The one place a host provider's failure becomes a guest-visible status.
//!
//! Section 5 names two codes for a host that cannot do what a request
//! needs: `ENOMEM`, a host allocation failed (CREATE, 7.2; an eviction's
//! move, 11; the memfd a small object is promoted to before `MAP_SHM` or
//! `EXPORT_UUID` hands its fd out, 7.2, 7.5), and `EIO`, the host kernel failed an operation, its errno
//! logged (a shared object that is not a usable dma-buf, 7.2; a copy, sync
//! or fence query on a backing, 7.5, 7.6, 9). The cause is logged here,
//! once; the guest sees only the code.

use std::fmt::Display;

use virtio_dmabuf_protocol::Status;

use crate::provider::ProviderError;

/// What the exporter asked the provider for, which decides the status and
/// how loudly the host is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProviderCall {
    /// Memory for a guest's `CREATE`: a guest can exhaust it, so a warning.
    Create,
    /// Memory an eviction moves an object to: the daemon's own work.
    Move,
    /// A memfd of its own for an extent of a slab whose fd is to be handed
    /// out (`MAP_SHM`, `EXPORT_UUID`): asked for by a guest, so a warning.
    Promote,
    /// A dma-buf a guest named by shared-object UUID: the guest's choice, so
    /// a warning.
    SharedObject,
    /// Bytes, syncs or fences of a backing the model already holds.
    Access,
}

impl ProviderCall {
    fn status(self) -> Status {
        match self {
            ProviderCall::Create | ProviderCall::Promote | ProviderCall::Move => Status::NoMem,
            ProviderCall::SharedObject | ProviderCall::Access => Status::Io,
        }
    }

    fn level(self) -> log::Level {
        match self {
            ProviderCall::Create | ProviderCall::Promote | ProviderCall::SharedObject => {
                log::Level::Warn
            }
            ProviderCall::Move | ProviderCall::Access => log::Level::Error,
        }
    }
}

/// Logs `error` (what was being done: `doing`) and returns the status the
/// contract names for a failed `call`.
pub(crate) fn provider_status(
    call: ProviderCall,
    doing: impl Display,
    error: &ProviderError,
) -> Status {
    log::log!(call.level(), "{doing}: {error}");
    // Out of open files (the process's or the system's table): the
    // daemon's limits keep every guest at quota within RLIMIT_NOFILE, so
    // this is a table being full (ENOSPC, section 5), not memory.
    if matches!(call, ProviderCall::Create | ProviderCall::Promote)
        && matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    {
        return Status::NoSpc;
    }
    call.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_enomem_and_everything_else_eio() {
        let e = ProviderError::Unsuitable("test".into());
        assert_eq!(
            provider_status(ProviderCall::Create, "c", &e),
            Status::NoMem
        );
        assert_eq!(provider_status(ProviderCall::Move, "m", &e), Status::NoMem);
        assert_eq!(
            provider_status(ProviderCall::Promote, "p", &e),
            Status::NoMem
        );
        assert_eq!(
            provider_status(ProviderCall::SharedObject, "s", &e),
            Status::Io
        );
        assert_eq!(provider_status(ProviderCall::Access, "a", &e), Status::Io);
    }

    #[test]
    fn a_create_or_promotion_out_of_open_files_is_enospc() {
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let e = ProviderError::host("memfd_create", errno);
            assert_eq!(
                provider_status(ProviderCall::Create, "c", &e),
                Status::NoSpc
            );
            assert_eq!(
                provider_status(ProviderCall::Promote, "p", &e),
                Status::NoSpc
            );
            assert_eq!(provider_status(ProviderCall::Access, "a", &e), Status::Io);
        }
    }
}
