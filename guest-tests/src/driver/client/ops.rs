// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The blocking typed operations of section 7, on the controlq.

use super::*;

impl Driver {
    pub(super) fn typed<T>(
        &self,
        request: Request,
        pick: impl FnOnce(Reply) -> Result<T, Reply>,
    ) -> Result<Outcome<T>, DriverError> {
        let opcode = request.opcode();
        match self.call(&request)? {
            Ok(reply) => pick(reply)
                .map(Ok)
                .map_err(|reply| DriverError::UnexpectedReply {
                    opcode,
                    reply: Box::new(reply),
                }),
            Err(status) => Ok(Err(status)),
        }
    }

    pub(super) fn empty(&self, request: Request) -> Result<Outcome<()>, DriverError> {
        self.typed(request, |r| match r {
            Reply::Empty => Ok(()),
            other => Err(other),
        })
    }

    pub fn get_info(&self) -> Result<Outcome<Info>, DriverError> {
        self.typed(Request::GetInfo, |r| match r {
            Reply::Info(i) => Ok(i),
            other => Err(other),
        })
    }

    pub fn reset_session(&self) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::ResetSession)
    }

    pub fn cancel(&self, tag: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Cancel { tag })
    }

    pub(super) fn object(&self, request: Request) -> Result<Outcome<ObjectReply>, DriverError> {
        self.typed(request, |r| match r {
            Reply::Object(o) => Ok(o),
            other => Err(other),
        })
    }

    /// `CREATE` of a host-placed object; `flags` from `create_flags`
    /// (`GUEST_PAGES` sends an empty entry list: use
    /// [`create_guest`](Self::create_guest) for real entries).
    pub fn create(&self, size: u64, flags: u32) -> Result<Outcome<ObjectReply>, DriverError> {
        use virtio_dmabuf_protocol::create_flags as f;
        self.object(Request::Create {
            size,
            dynamic: flags & f::DYNAMIC != 0,
            cache_mapping: flags & f::CACHE_MAPPING != 0,
            guest_pages: (flags & f::GUEST_PAGES != 0).then(Vec::new),
        })
    }

    /// `CREATE` with `GUEST_PAGES` over `entries` of guest memory.
    pub fn create_guest(
        &self,
        size: u64,
        cache_mapping: bool,
        entries: &[Segment],
    ) -> Result<Outcome<ObjectReply>, DriverError> {
        self.object(Request::Create {
            size,
            dynamic: false,
            cache_mapping,
            guest_pages: Some(entries.to_vec()),
        })
    }

    pub fn open_by_name(&self, name: &str) -> Result<Outcome<ObjectReply>, DriverError> {
        self.object(Request::Open {
            uuid: None,
            name: name.as_bytes().to_vec(),
        })
    }

    pub fn open_by_uuid(&self, uuid: [u8; 16]) -> Result<Outcome<ObjectReply>, DriverError> {
        self.object(Request::Open {
            uuid: Some(uuid),
            name: Vec::new(),
        })
    }

    pub fn release(&self, object: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Release { object })
    }

    pub fn export_uuid(&self, object: u64) -> Result<Outcome<[u8; 16]>, DriverError> {
        self.typed(Request::ExportUuid { object }, |r| match r {
            Reply::Uuid(u) => Ok(u),
            other => Err(other),
        })
    }

    /// `ATTACH`; `flags` from `attach_flags`.
    pub fn attach(&self, object: u64, flags: u32) -> Result<Outcome<u64>, DriverError> {
        use virtio_dmabuf_protocol::attach_flags as f;
        self.typed(
            Request::Attach {
                object,
                dynamic_importer: flags & f::DYNAMIC_IMPORTER != 0,
                peer2peer: flags & f::PEER2PEER != 0,
            },
            |r| match r {
                Reply::Attachment(a) => Ok(a),
                other => Err(other),
            },
        )
    }

    pub fn detach(&self, attachment: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Detach { attachment })
    }

    /// `MAP`; `EOVERFLOW` is `Err(Status::Overflow)` here (use
    /// [`call`](Self::call) to see the count it carries).
    pub fn map(
        &self,
        attachment: u64,
        dir: Direction,
        max_entries: u32,
        ctx: u64,
    ) -> Result<Outcome<MapReply>, DriverError> {
        let request = Request::Map {
            attachment,
            dir,
            max_entries,
            ctx,
        };
        self.typed(request, |r| match r {
            Reply::Map(m) => Ok(Ok(m)),
            Reply::MapOverflow { .. } => Ok(Err(Status::Overflow)),
            other => Err(other),
        })
        .map(|o| o.and_then(|inner| inner))
    }

    pub fn unmap(&self, mapping: u64, ctx: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Unmap { mapping, ctx })
    }

    pub fn pin(&self, attachment: u64, ctx: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Pin { attachment, ctx })
    }

    pub fn unpin(&self, attachment: u64, ctx: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Unpin { attachment, ctx })
    }

    /// `ACQUIRE_INIT`: `(ctx, stamp)`.
    pub fn acquire_init(&self) -> Result<Outcome<(u64, u64)>, DriverError> {
        self.typed(Request::AcquireInit, |r| match r {
            Reply::Acquire { ctx, stamp } => Ok((ctx, stamp)),
            other => Err(other),
        })
    }

    pub fn acquire_fini(&self, ctx: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::AcquireFini { ctx })
    }

    /// `LOCK`; `flags` from `lock_flags`. Blocks while the request parks:
    /// use [`submit`](Self::submit) to keep it in flight instead.
    pub fn lock(&self, ctx: u64, object: u64, flags: u32) -> Result<Outcome<()>, DriverError> {
        self.empty(lock_request(ctx, object, flags))
    }

    pub fn unlock(&self, ctx: u64, object: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Unlock { ctx, object })
    }

    pub fn begin_cpu_access(
        &self,
        object: u64,
        dir: Direction,
    ) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::BeginCpuAccess { object, dir })
    }

    pub fn end_cpu_access(&self, object: u64, dir: Direction) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::EndCpuAccess { object, dir })
    }

    /// `MAP_SHM`: `(shm_offset, len)`.
    pub fn map_shm(&self, object: u64, writable: bool) -> Result<Outcome<(u64, u64)>, DriverError> {
        self.typed(Request::MapShm { object, writable }, |r| match r {
            Reply::Shm { shm_offset, len } => Ok((shm_offset, len)),
            other => Err(other),
        })
    }

    pub fn unmap_shm(&self, object: u64) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::UnmapShm { object })
    }

    pub fn transfer_to_host(
        &self,
        object: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::TransferToHost {
            object,
            offset,
            data: data.to_vec(),
        })
    }

    pub fn transfer_from_host(
        &self,
        object: u64,
        offset: u64,
        len: u64,
    ) -> Result<Outcome<Vec<u8>>, DriverError> {
        let request = Request::TransferFromHost {
            object,
            offset,
            len,
        };
        self.typed(request, |r| match r {
            Reply::Data(d) => Ok(d),
            other => Err(other),
        })
    }

    pub fn fence_attach(
        &self,
        ctx: u64,
        object: u64,
        usage: FenceUsage,
    ) -> Result<Outcome<u64>, DriverError> {
        self.fence_attach_with(ctx, object, usage, false)
    }

    /// `FENCE_ATTACH`, with `fence_attach_flags::HOST` when `host`: the
    /// fence must also reach the host's reservation of the dma-buf.
    pub fn fence_attach_with(
        &self,
        ctx: u64,
        object: u64,
        usage: FenceUsage,
        host: bool,
    ) -> Result<Outcome<u64>, DriverError> {
        let request = Request::FenceAttach {
            ctx,
            object,
            usage,
            host,
        };
        self.typed(request, |r| match r {
            Reply::Fence(f) => Ok(f),
            other => Err(other),
        })
    }

    pub fn fence_signal(&self, fence: u64, error: u32) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::FenceSignal { fence, error })
    }

    /// `WAIT`. Blocks while the request parks (bounded by the driver
    /// timeout, so keep `timeout_ns` below it or use `submit`).
    pub fn wait(
        &self,
        object: u64,
        usage: FenceUsage,
        timeout_ns: u64,
    ) -> Result<Outcome<()>, DriverError> {
        self.empty(Request::Wait {
            object,
            usage,
            timeout_ns,
        })
    }
}
