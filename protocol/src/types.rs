// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Constants, enums and typed requests, replies and events.

use std::fmt;

/// Virtio device ID of the dmabuf device (section 1).
pub const VIRTIO_ID_DMABUF: u32 = 37;
/// Version of the contract reported by `GET_INFO`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Index of the first control queue.
pub const CONTROLQ: u16 = 0;
/// Index of the event queue.
pub const EVENTQ: u16 = 1;

/// Size of `virtio_dmabuf_req_hdr`.
pub const REQ_HDR_SIZE: usize = 16;
/// Size of `virtio_dmabuf_resp_hdr`.
pub const RESP_HDR_SIZE: usize = 16;
/// Size of `virtio_dmabuf_event`.
pub const EVENT_SIZE: usize = 32;
/// Size of the configuration space structure.
pub const CONFIG_SIZE: usize = 24;
/// Size of the `GET_INFO` reply.
pub const INFO_SIZE: usize = 80;
/// Size of the `CREATE`/`OPEN` reply.
pub const OBJECT_REPLY_SIZE: usize = 40;
/// Size of the fixed part of the `MAP` reply.
pub const MAP_REPLY_FIXED_SIZE: usize = 32;
/// Size of one `{ le64 addr; le64 len }` segment entry.
pub const SEGMENT_SIZE: usize = 16;
/// Length of the NUL-padded export name in `OPEN`.
pub const NAME_LEN: usize = 32;

/// Request opcodes (section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Opcode {
    GetInfo = 0x0001,
    ResetSession = 0x0002,
    Cancel = 0x0003,
    Create = 0x0100,
    Open = 0x0101,
    Release = 0x0102,
    ExportUuid = 0x0103,
    Attach = 0x0200,
    Detach = 0x0201,
    Map = 0x0202,
    Unmap = 0x0203,
    Pin = 0x0204,
    Unpin = 0x0205,
    AcquireInit = 0x0300,
    AcquireFini = 0x0301,
    Lock = 0x0302,
    Unlock = 0x0303,
    BeginCpuAccess = 0x0400,
    EndCpuAccess = 0x0401,
    MapShm = 0x0402,
    UnmapShm = 0x0403,
    TransferToHost = 0x0404,
    TransferFromHost = 0x0405,
    FenceAttach = 0x0500,
    FenceSignal = 0x0501,
    Wait = 0x0502,
}

impl Opcode {
    /// Every opcode of version 1, in numeric order.
    pub const ALL: [Opcode; 26] = [
        Opcode::GetInfo,
        Opcode::ResetSession,
        Opcode::Cancel,
        Opcode::Create,
        Opcode::Open,
        Opcode::Release,
        Opcode::ExportUuid,
        Opcode::Attach,
        Opcode::Detach,
        Opcode::Map,
        Opcode::Unmap,
        Opcode::Pin,
        Opcode::Unpin,
        Opcode::AcquireInit,
        Opcode::AcquireFini,
        Opcode::Lock,
        Opcode::Unlock,
        Opcode::BeginCpuAccess,
        Opcode::EndCpuAccess,
        Opcode::MapShm,
        Opcode::UnmapShm,
        Opcode::TransferToHost,
        Opcode::TransferFromHost,
        Opcode::FenceAttach,
        Opcode::FenceSignal,
        Opcode::Wait,
    ];

    /// The opcode with this wire value, if version 1 has one.
    pub fn from_u32(value: u32) -> Option<Opcode> {
        Opcode::ALL.iter().copied().find(|op| *op as u32 == value)
    }

    /// The contract's name of the opcode, as `ctl stats` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::GetInfo => "GET_INFO",
            Opcode::ResetSession => "RESET_SESSION",
            Opcode::Cancel => "CANCEL",
            Opcode::Create => "CREATE",
            Opcode::Open => "OPEN",
            Opcode::Release => "RELEASE",
            Opcode::ExportUuid => "EXPORT_UUID",
            Opcode::Attach => "ATTACH",
            Opcode::Detach => "DETACH",
            Opcode::Map => "MAP",
            Opcode::Unmap => "UNMAP",
            Opcode::Pin => "PIN",
            Opcode::Unpin => "UNPIN",
            Opcode::AcquireInit => "ACQUIRE_INIT",
            Opcode::AcquireFini => "ACQUIRE_FINI",
            Opcode::Lock => "LOCK",
            Opcode::Unlock => "UNLOCK",
            Opcode::BeginCpuAccess => "BEGIN_CPU_ACCESS",
            Opcode::EndCpuAccess => "END_CPU_ACCESS",
            Opcode::MapShm => "MAP_SHM",
            Opcode::UnmapShm => "UNMAP_SHM",
            Opcode::TransferToHost => "TRANSFER_TO_HOST",
            Opcode::TransferFromHost => "TRANSFER_FROM_HOST",
            Opcode::FenceAttach => "FENCE_ATTACH",
            Opcode::FenceSignal => "FENCE_SIGNAL",
            Opcode::Wait => "WAIT",
        }
    }

    /// The flag bits this opcode accepts; any other bit is `EINVAL`.
    pub fn valid_flags(self) -> u32 {
        match self {
            Opcode::Create => create_flags::ALL,
            Opcode::Open => open_flags::BY_UUID,
            Opcode::Attach => attach_flags::ALL,
            Opcode::Lock => lock_flags::ALL,
            Opcode::MapShm => map_shm_flags::WRITABLE,
            Opcode::FenceAttach => fence_attach_flags::ALL,
            _ => 0,
        }
    }

    /// Size of the fixed part of this opcode's reply, after the response header.
    pub fn fixed_reply_size(self) -> usize {
        match self {
            Opcode::GetInfo => INFO_SIZE,
            Opcode::Create | Opcode::Open => OBJECT_REPLY_SIZE,
            Opcode::ExportUuid => 16,
            Opcode::Attach | Opcode::FenceAttach => 8,
            Opcode::Map => MAP_REPLY_FIXED_SIZE,
            Opcode::AcquireInit | Opcode::MapShm => 16,
            _ => 0,
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `CREATE` flags (section 7.2).
pub mod create_flags {
    pub const DYNAMIC: u32 = 0x1;
    pub const GUEST_PAGES: u32 = 0x2;
    pub const CACHE_MAPPING: u32 = 0x4;
    pub const ALL: u32 = DYNAMIC | GUEST_PAGES | CACHE_MAPPING;
}

/// `OPEN` flags (section 7.2).
pub mod open_flags {
    pub const BY_UUID: u32 = 0x1;
}

/// `ATTACH` flags (section 7.3).
pub mod attach_flags {
    pub const DYNAMIC_IMPORTER: u32 = 0x1;
    pub const PEER2PEER: u32 = 0x2;
    pub const ALL: u32 = DYNAMIC_IMPORTER | PEER2PEER;
}

/// `LOCK` flags (section 7.4).
pub mod lock_flags {
    pub const TRY: u32 = 0x1;
    pub const SLOW: u32 = 0x2;
    pub const ALL: u32 = TRY | SLOW;
}

/// `MAP_SHM` flags (section 7.5).
pub mod map_shm_flags {
    pub const WRITABLE: u32 = 0x1;
}

/// `FENCE_ATTACH` flags: an addition of this project to section 7.6
/// (`docs/protocol.md`, "Host fences"); a device without it answers
/// `EINVAL` to any bit.
pub mod fence_attach_flags {
    /// The fence must also reach the host: it is installed in the kernel
    /// dma-buf's reservation (`EOPNOTSUPP` where that cannot be done,
    /// `EINVAL` with usage BOOKKEEP).
    pub const HOST: u32 = 0x1;
    pub const ALL: u32 = HOST;
}

/// `obj_flags` of the `CREATE`/`OPEN` reply (section 7.2).
pub mod obj_flags {
    pub const DYNAMIC: u32 = 0x1;
    pub const GUEST_PAGES: u32 = 0x2;
    pub const CACHE_MAPPING: u32 = 0x4;
    pub const WRITABLE: u32 = 0x8;
    pub const REAL_DMABUF: u32 = 0x10;
}

/// `map_flags` of the `MAP` reply (section 7.3).
pub mod map_flags {
    pub const CACHED: u32 = 0x1;
    pub const PINNED: u32 = 0x2;
}

/// `caps` bits of the `GET_INFO` reply (section 7.1).
pub mod caps {
    pub const HOST_SHM: u32 = 1 << 0;
    pub const GUEST_PAGES: u32 = 1 << 1;
    pub const TRANSFER: u32 = 1 << 2;
    pub const SHARED_OBJECTS: u32 = 1 << 3;
    pub const REAL_DMABUF: u32 = 1 << 4;
    pub const FENCES: u32 = 1 << 5;
    pub const HOST_EXPORTS: u32 = 1 << 6;
    /// An addition of this project (`docs/protocol.md`, "Host fences"): the
    /// host has a source of signalable fences, so a fence attached to an
    /// object backed by a kernel dma-buf is also installed in that
    /// dma-buf's reservation, and `FENCE_ATTACH` with
    /// `fence_attach_flags::HOST` works.
    pub const HOST_FENCES: u32 = 1 << 7;
}

/// `DMA_BUF_IOCTL_SYNC` flags (section 9, `include/uapi/linux/dma-buf.h`).
pub mod sync_flags {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const RW: u64 = READ | WRITE;
    pub const START: u64 = 0;
    pub const END: u64 = 1 << 2;
}

/// Status codes (section 5): asm-generic errno numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    Perm = 1,
    NoEnt = 2,
    Io = 5,
    NoMem = 12,
    Fault = 14,
    Busy = 16,
    Inval = 22,
    NoSpc = 28,
    Deadlk = 35,
    NoSys = 38,
    Overflow = 75,
    NotSupported = 95,
    TimedOut = 110,
    Already = 114,
    Canceled = 125,
}

impl Status {
    /// Every status of version 1.
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::Perm,
        Status::NoEnt,
        Status::Io,
        Status::NoMem,
        Status::Fault,
        Status::Busy,
        Status::Inval,
        Status::NoSpc,
        Status::Deadlk,
        Status::NoSys,
        Status::Overflow,
        Status::NotSupported,
        Status::TimedOut,
        Status::Already,
        Status::Canceled,
    ];

    /// The status with this wire value.
    pub fn from_u32(value: u32) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| *s as u32 == value)
    }

    /// The errno name, as `ctl stats` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Perm => "EPERM",
            Status::NoEnt => "ENOENT",
            Status::Io => "EIO",
            Status::NoMem => "ENOMEM",
            Status::Fault => "EFAULT",
            Status::Busy => "EBUSY",
            Status::Inval => "EINVAL",
            Status::NoSpc => "ENOSPC",
            Status::Deadlk => "EDEADLK",
            Status::NoSys => "ENOSYS",
            Status::Overflow => "EOVERFLOW",
            Status::NotSupported => "EOPNOTSUPP",
            Status::TimedOut => "ETIMEDOUT",
            Status::Already => "EALREADY",
            Status::Canceled => "ECANCELED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for Status {}

/// Linux `enum dma_data_direction` as the guest names it (section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Direction {
    Bidirectional = 0,
    ToDevice = 1,
    FromDevice = 2,
}

impl Direction {
    /// `NONE` (3) and anything larger are `EINVAL` everywhere.
    pub fn from_u32(value: u32) -> Option<Direction> {
        match value {
            0 => Some(Direction::Bidirectional),
            1 => Some(Direction::ToDevice),
            2 => Some(Direction::FromDevice),
            _ => None,
        }
    }

    /// The READ/WRITE bits of `DMA_BUF_IOCTL_SYNC` for this direction (section 9).
    pub fn sync_rw(self) -> u64 {
        match self {
            Direction::FromDevice => sync_flags::READ,
            Direction::ToDevice => sync_flags::WRITE,
            Direction::Bidirectional => sync_flags::RW,
        }
    }
}

/// Fence usages, ordered as in `dma-resv.h` (section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum FenceUsage {
    Kernel = 0,
    Write = 1,
    Read = 2,
    Bookkeep = 3,
}

impl FenceUsage {
    pub fn from_u32(value: u32) -> Option<FenceUsage> {
        match value {
            0 => Some(FenceUsage::Kernel),
            1 => Some(FenceUsage::Write),
            2 => Some(FenceUsage::Read),
            3 => Some(FenceUsage::Bookkeep),
            _ => None,
        }
    }

    /// `dma_resv_usage_rw`: what CPU access in `dir` must wait for (section 7.5).
    pub fn for_cpu_access(dir: Direction) -> FenceUsage {
        match dir {
            Direction::FromDevice => FenceUsage::Write,
            Direction::ToDevice | Direction::Bidirectional => FenceUsage::Read,
        }
    }
}

/// Where the addresses of a `MAP` reply live (section 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AddressSpace {
    Shm = 0,
    GuestPhys = 1,
    Object = 2,
}

impl AddressSpace {
    /// The address space with this wire value, if section 7.3 names one.
    pub fn from_u32(value: u32) -> Option<AddressSpace> {
        match value {
            0 => Some(AddressSpace::Shm),
            1 => Some(AddressSpace::GuestPhys),
            2 => Some(AddressSpace::Object),
            _ => None,
        }
    }
}

/// Provider reported by `GET_INFO` (section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ProviderKind {
    Memfd = 1,
    Udmabuf = 2,
    DmaHeap = 3,
}

impl ProviderKind {
    /// The provider with this wire value, if section 7.1 names one.
    pub fn from_u32(value: u32) -> Option<ProviderKind> {
        match value {
            1 => Some(ProviderKind::Memfd),
            2 => Some(ProviderKind::Udmabuf),
            3 => Some(ProviderKind::DmaHeap),
            _ => None,
        }
    }
}

/// Event types of the eventq (section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum EventType {
    MoveNotify = 1,
    Revoked = 2,
    Overflow = 3,
}

impl EventType {
    /// The event type with this wire value, if section 8 names one.
    pub fn from_u32(value: u32) -> Option<EventType> {
        match value {
            1 => Some(EventType::MoveNotify),
            2 => Some(EventType::Revoked),
            3 => Some(EventType::Overflow),
            _ => None,
        }
    }
}

/// The request header (section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader {
    pub opcode: u32,
    pub flags: u32,
    pub tag: u64,
}

/// One `{ le64 addr; le64 len }` entry of a segment list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub addr: u64,
    pub len: u64,
}

/// A decoded request (section 7): one variant per opcode, flags already
/// checked and split into fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetInfo,
    ResetSession,
    Cancel {
        tag: u64,
    },
    Create {
        size: u64,
        dynamic: bool,
        cache_mapping: bool,
        /// `Some` with `GUEST_PAGES`: the guest-physical entries.
        guest_pages: Option<Vec<Segment>>,
    },
    Open {
        /// `Some` with `BY_UUID`.
        uuid: Option<[u8; 16]>,
        /// The export name without its NUL padding (used without `BY_UUID`).
        name: Vec<u8>,
    },
    Release {
        object: u64,
    },
    ExportUuid {
        object: u64,
    },
    Attach {
        object: u64,
        dynamic_importer: bool,
        peer2peer: bool,
    },
    Detach {
        attachment: u64,
    },
    Map {
        attachment: u64,
        dir: Direction,
        /// `min(max_entries, entries the writable part holds)`.
        max_entries: u32,
        ctx: u64,
    },
    Unmap {
        mapping: u64,
        ctx: u64,
    },
    Pin {
        attachment: u64,
        ctx: u64,
    },
    Unpin {
        attachment: u64,
        ctx: u64,
    },
    AcquireInit,
    AcquireFini {
        ctx: u64,
    },
    Lock {
        ctx: u64,
        object: u64,
        try_lock: bool,
        slow: bool,
    },
    Unlock {
        ctx: u64,
        object: u64,
    },
    BeginCpuAccess {
        object: u64,
        dir: Direction,
    },
    EndCpuAccess {
        object: u64,
        dir: Direction,
    },
    MapShm {
        object: u64,
        writable: bool,
    },
    UnmapShm {
        object: u64,
    },
    TransferToHost {
        object: u64,
        offset: u64,
        /// Exactly `len` bytes that followed the payload.
        data: Vec<u8>,
    },
    TransferFromHost {
        object: u64,
        offset: u64,
        len: u64,
    },
    FenceAttach {
        ctx: u64,
        object: u64,
        usage: FenceUsage,
        /// `fence_attach_flags::HOST`: the fence must reach the host.
        host: bool,
    },
    FenceSignal {
        fence: u64,
        error: u32,
    },
    Wait {
        object: u64,
        usage: FenceUsage,
        timeout_ns: u64,
    },
}

impl Request {
    /// The opcode this request was decoded from.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::GetInfo => Opcode::GetInfo,
            Request::ResetSession => Opcode::ResetSession,
            Request::Cancel { .. } => Opcode::Cancel,
            Request::Create { .. } => Opcode::Create,
            Request::Open { .. } => Opcode::Open,
            Request::Release { .. } => Opcode::Release,
            Request::ExportUuid { .. } => Opcode::ExportUuid,
            Request::Attach { .. } => Opcode::Attach,
            Request::Detach { .. } => Opcode::Detach,
            Request::Map { .. } => Opcode::Map,
            Request::Unmap { .. } => Opcode::Unmap,
            Request::Pin { .. } => Opcode::Pin,
            Request::Unpin { .. } => Opcode::Unpin,
            Request::AcquireInit => Opcode::AcquireInit,
            Request::AcquireFini { .. } => Opcode::AcquireFini,
            Request::Lock { .. } => Opcode::Lock,
            Request::Unlock { .. } => Opcode::Unlock,
            Request::BeginCpuAccess { .. } => Opcode::BeginCpuAccess,
            Request::EndCpuAccess { .. } => Opcode::EndCpuAccess,
            Request::MapShm { .. } => Opcode::MapShm,
            Request::UnmapShm { .. } => Opcode::UnmapShm,
            Request::TransferToHost { .. } => Opcode::TransferToHost,
            Request::TransferFromHost { .. } => Opcode::TransferFromHost,
            Request::FenceAttach { .. } => Opcode::FenceAttach,
            Request::FenceSignal { .. } => Opcode::FenceSignal,
            Request::Wait { .. } => Opcode::Wait,
        }
    }
}

/// The `GET_INFO` reply (section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Info {
    pub version: u32,
    pub caps: u32,
    pub shm_size: u64,
    pub max_object_size: u64,
    pub page_size: u32,
    pub provider: u32,
    pub num_queues: u32,
    pub max_segments: u32,
    pub max_objects: u32,
    pub max_attachments: u32,
    pub max_contexts: u32,
    pub max_fences: u32,
    pub max_waiting: u32,
    pub max_pending_events: u32,
    pub max_bytes: u64,
}

/// The `CREATE`/`OPEN` reply (section 7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ObjectReply {
    pub object: u64,
    pub uuid: [u8; 16],
    pub size: u64,
    pub obj_flags: u32,
}

/// The `MAP` reply (section 7.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapReply {
    pub mapping: u64,
    pub generation: u64,
    pub map_flags: u32,
    pub space: AddressSpace,
    pub entries: Vec<Segment>,
}

/// A successful reply, or `EOVERFLOW` from `MAP` which carries a count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No payload after the response header.
    Empty,
    Info(Info),
    Object(ObjectReply),
    Uuid([u8; 16]),
    Attachment(u64),
    Map(MapReply),
    /// `EOVERFLOW`: the fixed `MAP` reply with `nr_entries` = `needed`.
    MapOverflow {
        needed: u32,
    },
    Acquire {
        ctx: u64,
        stamp: u64,
    },
    Shm {
        shm_offset: u64,
        len: u64,
    },
    Fence(u64),
    /// `TRANSFER_FROM_HOST`: the bytes that follow the response header.
    Data(Vec<u8>),
}

/// What a request ends with: a reply or an error status.
pub type Response = Result<Reply, Status>;

/// The status a response carries on the wire.
pub fn response_status(response: &Response) -> Status {
    match response {
        Ok(Reply::MapOverflow { .. }) => Status::Overflow,
        Ok(_) => Status::Ok,
        Err(status) => *status,
    }
}

/// One eventq event (section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventType,
    pub object: u64,
    pub attachment: u64,
    pub data: u64,
}

/// The configuration space (section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    pub num_queues: u32,
    pub page_size: u32,
    pub shm_size: u64,
    pub max_segments: u32,
}
