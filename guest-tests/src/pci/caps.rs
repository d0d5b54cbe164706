// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-pci capabilities of a modern device, read from its PCI
//! configuration space (virtio 1.2 section 4.1.4).
//!
//! Each vendor capability (`cap_vndr` 0x09) names a BAR, an offset and a
//! length; `cfg_type` says what lives there. The driver uses the first
//! capability of each type (the device lists them in order of preference)
//! and ignores those with a reserved BAR number or a type it does not know.

/// PCI capability ID of the virtio vendor capabilities.
pub const CAP_VENDOR: u8 = 0x09;

/// `cfg_type` values (virtio 1.2 section 4.1.4).
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
    pub const SHARED_MEMORY: u8 = 8;
}

/// Offset of the status register; bit 4 says a capability list exists.
const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// Offset of the first capability's pointer.
const PCI_CAPABILITY_LIST: usize = 0x34;
/// Capabilities live after the standard header.
const CAP_MIN_OFFSET: usize = 0x40;
/// A list in 256 bytes of config space holds at most this many entries;
/// more means a loop.
const MAX_CAPS: usize = 48;

/// `struct virtio_pci_cap`: 16 bytes.
const CAP_LEN: usize = 16;
/// `struct virtio_pci_notify_cap`: the cap and `notify_off_multiplier`.
const NOTIFY_CAP_LEN: usize = 20;
/// `struct virtio_pci_cap64`: the cap and the high halves of offset and
/// length.
const CAP64_LEN: usize = 24;

/// Highest BAR number; larger ones are reserved.
const MAX_BAR: u8 = 5;

/// Where one structure lives: a BAR and a range in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapRegion {
    pub bar: u8,
    pub offset: u64,
    pub length: u64,
    /// Where the capability itself sits in config space.
    pub cap_offset: u8,
}

impl CapRegion {
    /// The end of the range in its BAR, if it does not overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// The notification structure and its multiplier: queue `q` is notified at
/// `offset + queue_notify_off(q) * notify_off_multiplier` (section 4.1.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyCap {
    pub region: CapRegion,
    pub notify_off_multiplier: u32,
}

/// A shared memory region (`VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`, section
/// 4.1.4.7): its id and a 64-bit offset and length in its BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmCap {
    pub id: u8,
    pub region: CapRegion,
}

/// Every virtio structure a modern device exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: CapRegion,
    pub notify: NotifyCap,
    pub isr: CapRegion,
    /// Device-specific configuration; a device may have none.
    pub device: Option<CapRegion>,
    /// The PCI configuration access window (`VIRTIO_PCI_CAP_PCI_CFG`).
    pub pci_cfg: Option<CapRegion>,
    /// Shared memory regions, in list order.
    pub shm: Vec<ShmCap>,
}

impl VirtioCaps {
    /// The first shared memory region with `id`.
    pub fn shm_region(&self, id: u8) -> Option<ShmCap> {
        self.shm.iter().copied().find(|s| s.id == id)
    }

    /// Every BAR some structure lives in, without repeats, ascending.
    pub fn bars(&self) -> Vec<u8> {
        let mut bars: Vec<u8> = [Some(self.common), Some(self.notify.region), Some(self.isr)]
            .into_iter()
            .chain([self.device])
            .flatten()
            .map(|r| r.bar)
            .chain(self.shm.iter().map(|s| s.region.bar))
            .collect();
        bars.sort_unstable();
        bars.dedup();
        bars
    }
}

/// Why the configuration space does not describe a modern virtio device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("config space is {0} bytes, shorter than the 64-byte header")]
    ShortHeader(usize),
    #[error("the status register says there is no capability list")]
    NoCapList,
    #[error("capability pointer {0:#x} is outside config space or in the header")]
    BadPointer(usize),
    #[error("capability list does not end within {MAX_CAPS} entries (a loop)")]
    Loop,
    #[error("virtio capability at {at:#x} (cfg_type {cfg_type}) is {len} bytes, needs {need}")]
    ShortCap {
        at: usize,
        cfg_type: u8,
        len: usize,
        need: usize,
    },
    #[error("capability at {0:#x} runs past the end of config space")]
    Truncated(usize),
    #[error("no virtio {0} capability")]
    Missing(&'static str),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Offsets of the capabilities in the list, in list order.
pub fn capability_offsets(config: &[u8]) -> Result<Vec<usize>, CapError> {
    if config.len() < CAP_MIN_OFFSET {
        return Err(CapError::ShortHeader(config.len()));
    }
    let status = u16_at(config, PCI_STATUS).ok_or(CapError::ShortHeader(config.len()))?;
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Err(CapError::NoCapList);
    }
    let mut offsets = Vec::new();
    // The low two bits of every pointer are reserved.
    let mut ptr = usize::from(config[PCI_CAPABILITY_LIST] & 0xfc);
    while ptr != 0 {
        if offsets.len() == MAX_CAPS {
            return Err(CapError::Loop);
        }
        if ptr < CAP_MIN_OFFSET || ptr + 2 > config.len() {
            return Err(CapError::BadPointer(ptr));
        }
        offsets.push(ptr);
        ptr = usize::from(config[ptr + 1] & 0xfc);
    }
    Ok(offsets)
}

/// One vendor capability, decoded; `None` for those the driver must ignore.
fn decode_vendor_cap(
    config: &[u8],
    at: usize,
) -> Result<Option<(u8, u8, CapRegion, u32)>, CapError> {
    let header = config.get(at..at + 4).ok_or(CapError::Truncated(at))?;
    let (cap_len, cfg_type) = (usize::from(header[2]), header[3]);
    let need = match cfg_type {
        cfg_type::NOTIFY => NOTIFY_CAP_LEN,
        cfg_type::SHARED_MEMORY => CAP64_LEN,
        _ => CAP_LEN,
    };
    if cap_len < need {
        return Err(CapError::ShortCap {
            at,
            cfg_type,
            len: cap_len,
            need,
        });
    }
    let body = config.get(at..at + need).ok_or(CapError::Truncated(at))?;
    let bar = body[4];
    if bar > MAX_BAR {
        return Ok(None);
    }
    let id = body[5];
    let lo = |o: usize| u32_at(body, o).map_or(0, u64::from);
    let (mut offset, mut length) = (lo(8), lo(12));
    let mut extra = 0;
    match cfg_type {
        cfg_type::NOTIFY => extra = u32_at(body, 16).unwrap_or(0),
        cfg_type::SHARED_MEMORY => {
            offset |= lo(16) << 32;
            length |= lo(20) << 32;
        }
        _ => {}
    }
    let region = CapRegion {
        bar,
        offset,
        length,
        cap_offset: u8::try_from(at).map_err(|_| CapError::BadPointer(at))?,
    };
    Ok(Some((cfg_type, id, region, extra)))
}

/// Parses the virtio capabilities out of a device's config space (the
/// first 256 bytes are enough).
pub fn parse_caps(config: &[u8]) -> Result<VirtioCaps, CapError> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    let mut pci_cfg = None;
    let mut shm = Vec::new();
    for at in capability_offsets(config)? {
        if config[at] != CAP_VENDOR {
            continue;
        }
        let Some((kind, id, region, extra)) = decode_vendor_cap(config, at)? else {
            continue;
        };
        match kind {
            cfg_type::COMMON => {
                common.get_or_insert(region);
            }
            cfg_type::NOTIFY => {
                notify.get_or_insert(NotifyCap {
                    region,
                    notify_off_multiplier: extra,
                });
            }
            cfg_type::ISR => {
                isr.get_or_insert(region);
            }
            cfg_type::DEVICE => {
                device.get_or_insert(region);
            }
            cfg_type::PCI => {
                pci_cfg.get_or_insert(region);
            }
            cfg_type::SHARED_MEMORY => shm.push(ShmCap { id, region }),
            _ => {}
        }
    }
    Ok(VirtioCaps {
        common: common.ok_or(CapError::Missing("common configuration"))?,
        notify: notify.ok_or(CapError::Missing("notification"))?,
        isr: isr.ok_or(CapError::Missing("ISR status"))?,
        device,
        pci_cfg,
        shm,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A config space with the capability list bit set and `caps` placed
    /// from 0x40 on, each linked to the next.
    fn config_with(caps: &[Vec<u8>]) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&[0xf4, 0x1a, 0x65, 0x10]);
        c[PCI_STATUS] = PCI_STATUS_CAP_LIST as u8;
        let mut at = CAP_MIN_OFFSET;
        c[PCI_CAPABILITY_LIST] = if caps.is_empty() { 0 } else { at as u8 };
        for (i, cap) in caps.iter().enumerate() {
            c[at..at + cap.len()].copy_from_slice(cap);
            let next = at + cap.len().next_multiple_of(4);
            c[at + 1] = if i + 1 == caps.len() { 0 } else { next as u8 };
            at = next;
        }
        c
    }

    fn vcap(cfg_type: u8, bar: u8, id: u8, offset: u32, length: u32) -> Vec<u8> {
        let mut v = vec![CAP_VENDOR, 0, CAP_LEN as u8, cfg_type, bar, id, 0, 0];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&length.to_le_bytes());
        v
    }

    fn notify_cap(bar: u8, offset: u32, length: u32, mult: u32) -> Vec<u8> {
        let mut v = vcap(cfg_type::NOTIFY, bar, 0, offset, length);
        v[2] = NOTIFY_CAP_LEN as u8;
        v.extend_from_slice(&mult.to_le_bytes());
        v
    }

    fn shm_cap(bar: u8, id: u8, offset: u64, length: u64) -> Vec<u8> {
        let mut v = vcap(
            cfg_type::SHARED_MEMORY,
            bar,
            id,
            offset as u32,
            length as u32,
        );
        v[2] = CAP64_LEN as u8;
        v.extend_from_slice(&((offset >> 32) as u32).to_le_bytes());
        v.extend_from_slice(&((length >> 32) as u32).to_le_bytes());
        v
    }

    /// The layout QEMU gives a modern device: everything in BAR 4, an
    /// MSI-X capability in between, the shm region in BAR 2.
    fn qemu_like() -> Vec<Vec<u8>> {
        vec![
            vec![0x11, 0, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 0], // MSI-X
            vcap(cfg_type::COMMON, 4, 0, 0, 0x1000),
            vcap(cfg_type::ISR, 4, 0, 0x1000, 0x1000),
            vcap(cfg_type::DEVICE, 4, 0, 0x2000, 0x1000),
            notify_cap(4, 0x3000, 0x1000, 4),
            vcap(cfg_type::PCI, 0, 0, 0, 0),
            shm_cap(2, 0, 0x1_0000_0000, 0x4000_0000),
        ]
    }

    #[test]
    fn parses_every_structure_of_a_modern_device() {
        let caps = parse_caps(&config_with(&qemu_like())).unwrap();
        assert_eq!(
            caps.common,
            CapRegion {
                bar: 4,
                offset: 0,
                length: 0x1000,
                cap_offset: 0x4c
            }
        );
        assert_eq!(caps.isr.offset, 0x1000);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.notify.region.offset, 0x3000);
        assert_eq!(caps.notify.notify_off_multiplier, 4);
        assert!(caps.pci_cfg.is_some());
        assert_eq!(caps.bars(), vec![2, 4]);
    }

    #[test]
    fn shared_memory_offset_and_length_are_64_bit() {
        let caps = parse_caps(&config_with(&qemu_like())).unwrap();
        let shm = caps.shm_region(0).unwrap();
        assert_eq!(shm.region.bar, 2);
        assert_eq!(shm.region.offset, 0x1_0000_0000);
        assert_eq!(shm.region.length, 0x4000_0000);
        assert_eq!(caps.shm_region(1), None);
    }

    #[test]
    fn first_capability_of_a_type_wins() {
        let mut list = qemu_like();
        list.push(vcap(cfg_type::COMMON, 1, 0, 0x800, 0x100));
        list.insert(0, vcap(cfg_type::ISR, 0, 0, 0x40, 1));
        let caps = parse_caps(&config_with(&list)).unwrap();
        assert_eq!(caps.common.bar, 4);
        assert_eq!((caps.isr.bar, caps.isr.offset), (0, 0x40));
    }

    #[test]
    fn reserved_bar_and_unknown_types_are_ignored() {
        let mut list = qemu_like();
        list.insert(0, vcap(cfg_type::COMMON, 6, 0, 0, 0x1000));
        list.insert(0, vcap(0x42, 0, 0, 0, 0x1000));
        let caps = parse_caps(&config_with(&list)).unwrap();
        assert_eq!(caps.common.bar, 4);
    }

    #[test]
    fn a_device_without_device_config_or_shm_parses() {
        let list = vec![
            vcap(cfg_type::COMMON, 4, 0, 0, 0x1000),
            vcap(cfg_type::ISR, 4, 0, 0x1000, 0x1000),
            notify_cap(4, 0x3000, 0x1000, 0),
        ];
        let caps = parse_caps(&config_with(&list)).unwrap();
        assert_eq!(caps.device, None);
        assert!(caps.shm.is_empty());
        assert_eq!(caps.notify.notify_off_multiplier, 0);
    }

    #[test]
    fn missing_required_structures_are_errors() {
        let list = vec![
            vcap(cfg_type::COMMON, 4, 0, 0, 0x1000),
            notify_cap(4, 0x3000, 0x1000, 4),
        ];
        assert_eq!(
            parse_caps(&config_with(&list)),
            Err(CapError::Missing("ISR status"))
        );
        assert_eq!(
            parse_caps(&config_with(&[])),
            Err(CapError::Missing("common configuration"))
        );
    }

    #[test]
    fn short_notify_and_shm_caps_are_errors() {
        let mut n = notify_cap(4, 0x3000, 0x1000, 4);
        n[2] = CAP_LEN as u8;
        let err = parse_caps(&config_with(&[n])).unwrap_err();
        assert!(matches!(err, CapError::ShortCap { need: 20, .. }), "{err}");
        let mut s = shm_cap(2, 0, 0, 0x1000);
        s[2] = 20;
        let err = parse_caps(&config_with(&[s])).unwrap_err();
        assert!(matches!(err, CapError::ShortCap { need: 24, .. }), "{err}");
    }

    #[test]
    fn no_capability_list_bit_is_an_error() {
        let mut c = config_with(&qemu_like());
        c[PCI_STATUS] = 0;
        assert_eq!(parse_caps(&c), Err(CapError::NoCapList));
        assert_eq!(parse_caps(&c[..32]), Err(CapError::ShortHeader(32)));
    }

    #[test]
    fn a_looping_list_is_an_error() {
        let mut c = config_with(&qemu_like());
        // The last capability points back at the first.
        let last = *capability_offsets(&c).unwrap().last().unwrap();
        c[last + 1] = CAP_MIN_OFFSET as u8;
        assert_eq!(parse_caps(&c), Err(CapError::Loop));
    }

    #[test]
    fn pointers_into_the_header_or_past_the_end_are_errors() {
        let mut c = config_with(&qemu_like());
        c[PCI_CAPABILITY_LIST] = 0x10;
        assert_eq!(parse_caps(&c), Err(CapError::BadPointer(0x10)));
        let mut c = config_with(&qemu_like());
        c.truncate(0x80);
        // The notification capability at 0x7c links to 0x90.
        assert_eq!(parse_caps(&c), Err(CapError::BadPointer(0x90)));
    }

    #[test]
    fn a_capability_cut_off_by_the_end_of_config_space_is_an_error() {
        let mut c = config_with(&qemu_like()[..5]);
        c.truncate(0x80);
        // The notification capability starts at 0x7c and needs 20 bytes.
        assert_eq!(parse_caps(&c), Err(CapError::Truncated(0x7c)));
    }
}
