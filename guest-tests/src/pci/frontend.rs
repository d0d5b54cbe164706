// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The PCI transport as a [`FrontEnd`] of the suite: guest `i` is the
//! `i`-th device function in this guest (each attached to its own daemon
//! socket by the VMM), and a [`PciSession`] is a [`Session`].
//!
//! What a guest cannot choose, a scenario asking for it is told so with
//! [`SessionError::Unsupported`] (it skips): the VMM, not the guest,
//! negotiated SHMEM and SHARED_OBJECT with the back-end.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use virtio_dmabuf_protocol::CONFIG_SIZE;

use crate::driver::Driver;
use crate::session::{Capabilities, FrontEnd, Session, SessionError};
use crate::vmm::VmmOptions;

use super::sysfs::{self, PciFunction, GPIO_DEVICE};
use super::{PciError, PciOptions, PciSession, PciTransport};

/// The device configuration QEMU 10's `vhost-user-gpio-pci` stand-in
/// shows: `struct virtio_gpio_config`, 8 bytes (section 1).
const GPIO_CONFIG_SIZE: u32 = 8;

/// One past the highest guest RAM address, from `/proc/iomem` text (the
/// top-level entries; root sees real addresses). The firmware marks the
/// top pages of RAM "Reserved" for its tables (SeaBIOS does on QEMU), and
/// the VMM still maps them as RAM, so a "System RAM" range extends
/// through the "Reserved" ranges that continue it.
pub fn ram_end_from_iomem(iomem: &str) -> Option<u64> {
    let entries: Vec<(u64, u64, &str)> = iomem
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start.trim(), 16).ok()?;
            let end = u64::from_str_radix(end.trim(), 16).ok()?.checked_add(1)?;
            Some((start, end, name.trim()))
        })
        .collect();
    let mut best = None;
    for (i, &(_, end, name)) in entries.iter().enumerate() {
        if name != "System RAM" {
            continue;
        }
        let mut end = end;
        for &(s, e, n) in &entries[i + 1..] {
            if s != end || n != "Reserved" {
                break;
            }
            end = e;
        }
        best = best.max(Some(end));
    }
    best
}

/// The device functions of this guest, one per guest of the suite.
#[derive(Debug, Clone)]
pub struct PciFrontEnd {
    functions: Vec<PciFunction>,
    base: PciOptions,
    ram_end: u64,
    /// Whether guest `i` has a session open: a second one would reset the
    /// device under the first.
    busy: Arc<Mutex<Vec<bool>>>,
}

impl PciFrontEnd {
    /// Finds `options.guests` devices (the one at `options.address` when
    /// it is set and one guest is asked for), binds each to
    /// `uio_pci_generic` and checks it has shared memory region 0 if
    /// `options.expect_shm`.
    pub fn discover(options: &PciOptions) -> Result<PciFrontEnd, PciError> {
        let wanted = options.guests.max(1);
        let functions = match (&options.address, wanted) {
            (Some(a), 1) => vec![sysfs::select(Some(a))?],
            _ => sysfs::find_candidates()?,
        };
        if functions.len() < wanted {
            return Err(PciError::Guests {
                wanted,
                found: functions.len(),
            });
        }
        let functions: Vec<PciFunction> = functions.into_iter().take(wanted).collect();
        for f in &functions {
            let t = PciTransport::bind(Some(&f.address))?;
            if options.expect_shm && t.shm().is_none() {
                return Err(PciError::NoShm(f.address.clone()));
            }
        }
        let iomem = std::fs::read_to_string("/proc/iomem").unwrap_or_default();
        Ok(PciFrontEnd {
            busy: Arc::new(Mutex::new(vec![false; functions.len()])),
            functions,
            base: options.clone(),
            ram_end: ram_end_from_iomem(&iomem).unwrap_or(0),
        })
    }

    pub fn functions(&self) -> &[PciFunction] {
        &self.functions
    }

    /// Session options for `vmm`'s asks, or why a guest cannot have them.
    fn session_options(&self, guest: usize, vmm: &VmmOptions) -> Result<PciOptions, SessionError> {
        let f = self
            .functions
            .get(guest)
            .ok_or_else(|| SessionError::Unsupported(format!("no device for guest {guest}")))?;
        if !vmm.shared_object {
            return Err(SessionError::Unsupported(
                "whether SHARED_OBJECT is acked is the VMM's choice, not the guest's".into(),
            ));
        }
        Ok(PciOptions {
            address: Some(f.address.clone()),
            event_idx: vmm.event_idx,
            indirect: vmm.indirect,
            queue_size: vmm.queue_size,
            timeout: vmm.timeout,
            num_queues: vmm.num_queues,
            ..self.base.clone()
        })
    }
}

impl FrontEnd for PciFrontEnd {
    fn describe(&self) -> String {
        let devices: Vec<String> = self
            .functions
            .iter()
            .map(|f| {
                let face = if f.device == GPIO_DEVICE {
                    " (vhost-user-gpio-pci stand-in)"
                } else {
                    ""
                };
                format!("{} {:04x}:{:04x}{face}", f.address, f.vendor, f.device)
            })
            .collect();
        format!(
            "virtio-pci from user space in this guest: {}",
            devices.join(", ")
        )
    }

    fn guests(&self) -> usize {
        self.functions.len()
    }

    fn connect(&self, guest: usize, vmm: &VmmOptions) -> Result<Box<dyn Session>, SessionError> {
        let options = self.session_options(guest, vmm)?;
        {
            let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
            match busy.get_mut(guest) {
                Some(b) if !*b => *b = true,
                _ => {
                    return Err(SessionError::Unsupported(format!(
                        "guest {guest}'s device already has a session; a real guest has one driver"
                    )))
                }
            }
        }
        let guard = BusyGuard {
            busy: self.busy.clone(),
            guest,
        };
        let session = PciTransport::open(options)
            .map_err(|e| SessionError::transport(format!("opening guest {guest}'s device"), e))?;
        if !vmm.shmem && session.shm().is_some() {
            return Err(SessionError::Unsupported(
                "the VMM negotiated SHMEM and shows region 0; a guest cannot refuse it".into(),
            ));
        }
        session.driver().set_chain_layout(vmm.chain_layout);
        Ok(Box::new(PciGuestSession {
            session,
            ram_end: self.ram_end,
            _guard: guard,
        }))
    }
}

/// Clears guest `guest`'s busy flag when its session ends.
struct BusyGuard {
    busy: Arc<Mutex<Vec<bool>>>,
    guest: usize,
}

impl fmt::Debug for BusyGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BusyGuard(guest {})", self.guest)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = busy.get_mut(self.guest) {
            *b = false;
        }
    }
}

/// A [`PciSession`] as the suite uses it.
#[derive(Debug)]
pub struct PciGuestSession {
    // Dropped first: the device is reset before the guard frees the slot.
    session: PciSession,
    ram_end: u64,
    _guard: BusyGuard,
}

impl PciGuestSession {
    pub fn pci(&self) -> &PciSession {
        &self.session
    }

    /// The device configuration bytes the device itself has (the DEVICE
    /// capability spans a whole page in QEMU).
    fn config_window(&self) -> u32 {
        let cap = u32::try_from(self.session.config_size()).unwrap_or(u32::MAX);
        let own = if self.session.transport().function().device == GPIO_DEVICE {
            GPIO_CONFIG_SIZE
        } else {
            CONFIG_SIZE as u32
        };
        own.min(cap)
    }
}

fn transport_err(what: &str) -> impl FnOnce(PciError) -> SessionError + '_ {
    move |e| SessionError::transport(what, e)
}

impl Session for PciGuestSession {
    fn driver(&self) -> &Driver {
        self.session.driver()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shm_size: self.session.shm_size().unwrap_or(0),
            shared_object: None,
            queue_num: self
                .session
                .transport()
                .common()
                .num_queues()
                .map_or(0, u64::from),
            config_window: self.config_window(),
        }
    }

    /// Bytes inside the window come from the device, the rest read as
    /// zero (as a vhost-user `GET_CONFIG` reply has them).
    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, SessionError> {
        let window = self.config_window();
        let mut out = vec![0u8; size as usize];
        let end = offset.saturating_add(size).min(window);
        if offset < end {
            let bytes = self
                .session
                .read_config(u64::from(offset), (end - offset) as usize)
                .map_err(transport_err("reading the device configuration"))?;
            out[..bytes.len()].copy_from_slice(&bytes);
        }
        Ok(out)
    }

    fn ram_end(&self) -> u64 {
        self.ram_end
    }

    fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, SessionError> {
        self.session
            .shm_read(offset, len)
            .map_err(transport_err("reading shared memory region 0"))
    }

    fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), SessionError> {
        self.session
            .shm_write(offset, data)
            .map_err(transport_err("writing shared memory region 0"))
    }

    fn reset(&mut self) -> Result<(), SessionError> {
        let layout = self.session.driver().chain_layout();
        self.session
            .reset()
            .map_err(transport_err("resetting the device"))?;
        self.session.driver().set_chain_layout(layout);
        Ok(())
    }

    /// A guest going away: the device is reset (by the drop).
    fn end(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_end_is_past_the_highest_system_ram_and_the_reserved_tail() {
        let iomem = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-1fffffff : System RAM
  01000000-022784c7 : Kernel code
b0000000-bfffffff : PCI MMIO
  b0000000-b0ffffff : System RAM
";
        assert_eq!(ram_end_from_iomem(iomem), Some(0x2000_0000));
        // QEMU q35 with 512 MiB: SeaBIOS reserves the top 128 KiB.
        let q35 = "\
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
00100000-1ffdffff : System RAM
1ffe0000-1fffffff : Reserved
20000000-afffffff : PCI Bus 0000:00
fffc0000-ffffffff : Reserved
";
        assert_eq!(ram_end_from_iomem(q35), Some(0x2000_0000));
        assert_eq!(ram_end_from_iomem("00000000-00000000 : Reserved\n"), None);
    }
}
