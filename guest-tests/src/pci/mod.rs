// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device as a virtio-pci modern device, driven from user space inside
//! a real Linux guest, so the same [`Driver`] runs over real QEMU.
//!
//! - [`sysfs`]: find the device (1af4:1065, or QEMU 10's 1af4:1069
//!   stand-in, section 1), hand it to `uio_pci_generic`, its config space.
//! - [`caps`]: the virtio capabilities in config space.
//! - [`mmio`]: BARs mapped from `resourceN`, volatile register accesses.
//! - [`common`]: the common configuration and the initialisation sequence.
//! - [`dma`]: locked huge pages with guest-physical addresses from
//!   `/proc/self/pagemap`, as [`GuestMemory`](crate::driver::GuestMemory).
//! - [`irq`]: the [`Notifier`](crate::driver::Notifier): notification
//!   writes out, INTx through `/dev/uioN` in.
//! - [`shm`]: shared memory region 0.
//! - [`frontend`]: the devices of this guest as the suite's
//!   [`FrontEnd`](crate::session::FrontEnd), guest `i` on the `i`-th.
//!
//! [`PciTransport::open`] does everything and returns a [`PciSession`];
//! dropping the session resets the device before its memory is freed.
//! Interrupts are INTx only (MSI-X stays disabled: `uio_pci_generic`
//! never enables it, and every vector is `NO_VECTOR`).
//!
//! A process that dies without dropping its session leaves the device
//! live. Closing `/dev/uioN` clears bus mastering, but a vhost-user
//! back-end writes guest RAM through its own mapping and never sees that
//! bit, so it may still write pages the kernel has taken back: reboot a
//! guest whose driver died (the e2e guests are throwaway).

pub mod caps;
pub mod common;
pub mod dma;
pub mod frontend;
pub mod irq;
pub mod mmio;
pub mod shm;
pub mod sysfs;

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_dmabuf_protocol::{Request, Status, CONTROLQ};

use crate::driver::{Driver, DriverConfig, DriverError};

use caps::{CapError, CapRegion, VirtioCaps};
use common::{feature, CommonCfg, InitError};
use dma::{DmaError, DmaMemory};
use irq::{IrqCounts, PciNotifier, UioIrq};
use mmio::{BarMap, MapError, MmioError, Region};
use shm::ShmRegion;
use sysfs::{ConfigSpace, PciFunction, SysfsError};

pub use frontend::{PciFrontEnd, PciGuestSession};

/// The first 256 bytes of config space hold every virtio capability.
const CONFIG_HEADER: usize = 256;
/// How long the `RESET_SESSION` sent before a reset may take; the reset
/// goes ahead either way.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Re-reads of the device configuration before giving up on a device
/// whose `config_generation` keeps moving.
const CONFIG_RETRIES: usize = 16;

/// How to open the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciOptions {
    /// `DDDD:BB:DD.F`; `None` takes the first 1af4:1065, else 1af4:1069.
    pub address: Option<String>,
    /// Accept `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Accept `VIRTIO_RING_F_INDIRECT_DESC` if offered.
    pub indirect: bool,
    /// Largest ring size wanted; the device's maximum may be smaller, and
    /// the result is rounded down to a power of two.
    pub queue_size: u16,
    /// How long the driver's blocking calls wait.
    pub timeout: Duration,
    /// Queues to start (eventq included); `None` = as many as both the
    /// transport's `num_queues` and the device's `config.num_queues` say.
    pub num_queues: Option<u16>,
    /// Bytes of DMA memory for rings and buffers (whole 2 MiB pages).
    pub dma_bytes: usize,
    /// Send `RESET_SESSION` once the device is live, as a driver does at
    /// probe (section 7.1), and again before every reset and on close: a
    /// device reset inside the guest need not reach the back-end as one
    /// (QEMU stops the vrings, which keeps the state), and releasing while
    /// the front-end still holds the window mappings lets the back-end's
    /// `SHMEM_UNMAP`s find them.
    pub reset_session: bool,
    /// For [`PciFrontEnd::discover`]: how many devices (guests) to use.
    pub guests: usize,
    /// For [`PciFrontEnd::discover`]: fail unless every device has shared
    /// memory region 0.
    pub expect_shm: bool,
}

impl Default for PciOptions {
    fn default() -> Self {
        PciOptions {
            address: None,
            event_idx: true,
            indirect: true,
            queue_size: 256,
            timeout: Duration::from_secs(10),
            num_queues: None,
            dma_bytes: 16 << 20,
            reset_session: true,
            guests: 1,
            expect_shm: false,
        }
    }
}

/// Why the device could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    #[error("capabilities: {0}")]
    Caps(#[from] CapError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{what} structure {offset:#x}+{length:#x} is not inside BAR {bar} ({size:#x} bytes)")]
    OutsideBar {
        what: &'static str,
        bar: u8,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("initialisation: {0}")]
    Init(#[from] InitError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error("DMA memory: {0}")]
    Dma(#[from] DmaError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("interrupts: {0}")]
    Irq(#[source] io::Error),
    #[error(
        "{requested} queues asked for; the device has {available} (and at least 2 are needed)"
    )]
    Queues { requested: u16, available: u16 },
    #[error(
        "queue {queue}: notification offset {offset:#x} is outside the {len:#x}-byte structure"
    )]
    NotifyOutside { queue: u16, offset: u64, len: u64 },
    #[error("device config {offset:#x}+{len:#x} is past its {size:#x} bytes")]
    ConfigRange { offset: u64, len: usize, size: u64 },
    #[error("device config generation kept changing over {CONFIG_RETRIES} reads")]
    ConfigUnstable,
    #[error("RESET_SESSION at start: device status {0}")]
    ResetSession(Status),
    #[error("{wanted} guest device(s) asked for, {found} found")]
    Guests { wanted: usize, found: usize },
    #[error("{0} has no shared memory region 0 (a VMM without SHMEM, or QEMU 10's stand-in)")]
    NoShm(String),
}

/// A device bound to `uio_pci_generic`, its capabilities parsed and the
/// BARs they live in mapped. It holds `/dev/uioN` open: closing it clears
/// bus mastering.
#[derive(Debug)]
pub struct PciTransport {
    function: PciFunction,
    uio_path: PathBuf,
    uio: Arc<File>,
    config: Arc<ConfigSpace>,
    caps: VirtioCaps,
    common: CommonCfg,
    notify: Region,
    isr: Region,
    device_cfg: Option<Region>,
    shm: Option<ShmRegion>,
}

/// The BARs mapped so far, by number.
struct Bars<'a> {
    function: &'a PciFunction,
    maps: Vec<(u8, Arc<BarMap>)>,
}

impl Bars<'_> {
    fn resource(&self, bar: u8) -> PathBuf {
        sysfs::device_dir(&self.function.address).join(format!("resource{bar}"))
    }

    /// All of `bar`, mapped once.
    fn whole(&mut self, bar: u8) -> Result<Arc<BarMap>, PciError> {
        if let Some((_, m)) = self.maps.iter().find(|(b, _)| *b == bar) {
            return Ok(m.clone());
        }
        let m = BarMap::map(&self.resource(bar), None)?;
        self.maps.push((bar, m.clone()));
        Ok(m)
    }

    /// The structure `cap` describes, inside its whole BAR.
    fn region(&mut self, cap: CapRegion, what: &'static str) -> Result<Region, PciError> {
        let map = self.whole(cap.bar)?;
        Region::new(map.clone(), cap.offset, cap.length, what).ok_or(PciError::OutsideBar {
            what,
            bar: cap.bar,
            offset: cap.offset,
            length: cap.length,
            size: map.len(),
        })
    }

    /// A shared memory region: only its range is mapped, unless its BAR
    /// is mapped already (it may be large).
    fn shm(&mut self, cap: caps::ShmCap) -> Result<ShmRegion, PciError> {
        let region = if self.maps.iter().any(|(b, _)| *b == cap.region.bar) {
            self.region(cap.region, "shared memory")?
        } else {
            let r = cap.region;
            let map = BarMap::map(&self.resource(r.bar), Some((r.offset, r.length)))?;
            Region::new(map, 0, r.length, "shared memory").ok_or(PciError::OutsideBar {
                what: "shared memory",
                bar: r.bar,
                offset: r.offset,
                length: r.length,
                size: r.length,
            })?
        };
        Ok(ShmRegion::new(cap, region))
    }
}

impl PciTransport {
    /// Finds the device (or takes the one at `address`), binds it to
    /// `uio_pci_generic` unless it is already, maps its virtio structures
    /// and enables memory decoding and bus mastering.
    pub fn bind(address: Option<&str>) -> Result<PciTransport, PciError> {
        let function = sysfs::select(address)?;
        let uio_path = sysfs::bind_uio(&function)?;
        // Opened before bus mastering is enabled: uio_pci_generic clears
        // it again when the last descriptor closes.
        let uio = Arc::new(sysfs::open_uio(&uio_path)?);
        let config = Arc::new(ConfigSpace::open(&function)?);
        let caps = caps::parse_caps(&config.read_all(CONFIG_HEADER)?)?;
        config.enable_memory_and_bus_master()?;

        let mut bars = Bars {
            function: &function,
            maps: Vec::new(),
        };
        let common = CommonCfg::new(bars.region(caps.common, "common configuration")?)?;
        let notify = bars.region(caps.notify.region, "notification")?;
        let isr = bars.region(caps.isr, "ISR status")?;
        let device_cfg = caps
            .device
            .map(|d| bars.region(d, "device configuration"))
            .transpose()?;
        let shm = caps.shm_region(0).map(|c| bars.shm(c)).transpose()?;
        drop(bars);
        Ok(PciTransport {
            function,
            uio_path,
            uio,
            config,
            caps,
            common,
            notify,
            isr,
            device_cfg,
            shm,
        })
    }

    /// Binds the device and starts a session on it.
    pub fn open(options: PciOptions) -> Result<PciSession, PciError> {
        PciTransport::bind(options.address.as_deref())?.start(options)
    }

    /// Starts a session: fresh DMA memory, a full initialisation.
    pub fn start(self, options: PciOptions) -> Result<PciSession, PciError> {
        let memory = Arc::new(DmaMemory::allocate(options.dma_bytes)?);
        let started = start(&self, &memory, &options)?;
        Ok(PciSession {
            transport: self,
            memory,
            started,
            options,
        })
    }

    pub fn function(&self) -> &PciFunction {
        &self.function
    }

    pub fn uio_path(&self) -> &std::path::Path {
        &self.uio_path
    }

    pub fn caps(&self) -> &VirtioCaps {
        &self.caps
    }

    pub fn common(&self) -> &CommonCfg {
        &self.common
    }

    /// Bytes of device configuration the DEVICE capability spans (QEMU
    /// gives the structure a whole 4 KiB page, whatever the device has;
    /// bytes past the device's own read as all-ones there). 0 without one.
    pub fn config_size(&self) -> u64 {
        self.device_cfg.as_ref().map_or(0, Region::len)
    }

    /// `len` bytes of device configuration at `offset`, read until
    /// `config_generation` is the same before and after (section 4.1.4.3.1).
    pub fn read_config(&self, offset: u64, len: usize) -> Result<Vec<u8>, PciError> {
        let size = self.config_size();
        let range_err = PciError::ConfigRange { offset, len, size };
        let Some(region) = &self.device_cfg else {
            return Err(range_err);
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(range_err);
        }
        let mut out = vec![0u8; len];
        for _ in 0..CONFIG_RETRIES {
            let before = self.common.config_generation()?;
            for (i, b) in out.iter_mut().enumerate() {
                *b = region.read8(offset + i as u64)?;
            }
            if self.common.config_generation()? == before {
                return Ok(out);
            }
        }
        Err(PciError::ConfigUnstable)
    }

    /// Shared memory region 0, if the device has one (QEMU 11's
    /// `vhost-user-test-device-pci` does, QEMU 10's stand-in does not).
    pub fn shm(&self) -> Option<&ShmRegion> {
        self.shm.as_ref()
    }

    /// The queue count to start: the options', or what both the transport
    /// and `config.num_queues` allow.
    fn queue_count(&self, options: &PciOptions) -> Result<u16, PciError> {
        let available = self.common.num_queues()?;
        let from_config = if self.config_size() >= 4 {
            let b = self.read_config(0, 4)?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        } else {
            0
        };
        let n = match options.num_queues {
            Some(n) => n,
            None if from_config >= 2 => u16::try_from(from_config)
                .unwrap_or(u16::MAX)
                .min(available),
            None => available,
        };
        if n < 2 || n > available {
            return Err(PciError::Queues {
                requested: n,
                available,
            });
        }
        Ok(n)
    }
}

/// What one initialisation produced.
#[derive(Debug)]
struct Started {
    driver: Driver,
    notifier: Arc<PciNotifier>,
    offered: u64,
    features: u64,
}

/// The largest power of two not above `n` (n > 0).
fn power_of_two_floor(n: u16) -> u16 {
    1 << (u16::BITS - 1 - n.leading_zeros())
}

/// Initialises the device (sections 3.1.1, 4.1.5) with a driver over
/// `memory`; on failure the device is left reset.
fn start(t: &PciTransport, memory: &Arc<DmaMemory>, o: &PciOptions) -> Result<Started, PciError> {
    let result = initialise(t, memory, o);
    if result.is_err() {
        t.common.fail();
        let _ = t.common.reset();
    }
    result
}

fn initialise(
    t: &PciTransport,
    memory: &Arc<DmaMemory>,
    o: &PciOptions,
) -> Result<Started, PciError> {
    let mut wanted = 0;
    if o.event_idx {
        wanted |= feature::EVENT_IDX;
    }
    if o.indirect {
        wanted |= feature::INDIRECT_DESC;
    }
    let (offered, features) = t.common.negotiate(wanted)?;
    t.common.disable_config_vector()?;

    let num_queues = t.queue_count(o)?;
    let mut queue_size = o.queue_size.max(1);
    let mut offsets = Vec::with_capacity(usize::from(num_queues));
    for q in 0..num_queues {
        let (max, notify_off) = t.common.queue_info(q)?;
        if max == 0 {
            return Err(InitError::QueueUnavailable(q).into());
        }
        queue_size = queue_size.min(max);
        let offset = u64::from(notify_off) * u64::from(t.caps.notify.notify_off_multiplier);
        if offset + 2 > t.notify.len() {
            return Err(PciError::NotifyOutside {
                queue: q,
                offset,
                len: t.notify.len(),
            });
        }
        offsets.push(offset);
    }
    let irq = UioIrq::new(t.isr.clone(), t.uio.clone(), t.config.clone());
    irq.clear().map_err(PciError::Irq)?;
    let notifier = Arc::new(PciNotifier::new(t.notify.clone(), offsets, irq));

    let config = DriverConfig {
        num_queues,
        queue_size: power_of_two_floor(queue_size),
        event_idx: features & feature::EVENT_IDX != 0,
        indirect: features & feature::INDIRECT_DESC != 0,
        timeout: o.timeout,
    };
    let driver = Driver::new(
        memory.clone(),
        notifier.clone(),
        Arc::new(memory.pool()),
        config,
    )?;
    for (q, ring) in (0..num_queues).zip(driver.ring_layouts()) {
        t.common.setup_queue(q, &ring)?;
    }
    t.common.driver_ok()?;
    if o.reset_session {
        driver.reset_session()?.map_err(PciError::ResetSession)?;
    }
    Ok(Started {
        driver,
        notifier,
        offered,
        features,
    })
}

/// A started device and the driver on it.
#[derive(Debug)]
pub struct PciSession {
    transport: PciTransport,
    memory: Arc<DmaMemory>,
    started: Started,
    options: PciOptions,
}

impl PciSession {
    pub fn driver(&self) -> &Driver {
        &self.started.driver
    }

    pub fn transport(&self) -> &PciTransport {
        &self.transport
    }

    pub fn options(&self) -> &PciOptions {
        &self.options
    }

    /// Features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.started.offered
    }

    /// Features negotiated (VERSION_1 and whichever of EVENT_IDX and
    /// INDIRECT_DESC were both wanted and offered).
    pub fn features(&self) -> u64 {
        self.started.features
    }

    /// The DMA memory the driver's rings and buffers live in.
    pub fn memory(&self) -> &DmaMemory {
        &self.memory
    }

    pub fn config_size(&self) -> u64 {
        self.transport.config_size()
    }

    pub fn read_config(&self, offset: u64, len: usize) -> Result<Vec<u8>, PciError> {
        self.transport.read_config(offset, len)
    }

    pub fn shm(&self) -> Option<&ShmRegion> {
        self.transport.shm()
    }

    /// Bytes of shared memory region 0; `None` without one.
    pub fn shm_size(&self) -> Option<u64> {
        self.shm().map(ShmRegion::size)
    }

    pub fn shm_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, PciError> {
        let shm = self.shm().ok_or(PciError::Mmio(MmioError {
            what: "shared memory (none)",
            offset,
            width: len,
            len: 0,
        }))?;
        Ok(shm.read(offset, len)?)
    }

    pub fn shm_write(&self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let shm = self.shm().ok_or(PciError::Mmio(MmioError {
            what: "shared memory (none)",
            offset,
            width: data.len(),
            len: 0,
        }))?;
        Ok(shm.write(offset, data)?)
    }

    /// Interrupts serviced in this session.
    pub fn interrupts(&self) -> IrqCounts {
        self.started.notifier.interrupts().counts()
    }

    /// Waits for a configuration change interrupt (ISR bit 1).
    pub fn wait_config_change(&self, timeout: Duration) -> Result<bool, PciError> {
        self.started
            .notifier
            .interrupts()
            .wait_config(timeout)
            .map_err(PciError::Irq)
    }

    /// Resets the device and initialises it again with a new driver (the
    /// old one's tickets are gone), with `RESET_SESSION` before the reset
    /// and after the start when `options.reset_session` is set. On failure
    /// the device stays reset and the old driver's calls time out.
    pub fn reset(&mut self) -> Result<(), PciError> {
        self.release_session();
        // `start` resets the device before it touches memory, so the old
        // rings are dead before the new driver reuses their pages.
        self.started = start(&self.transport, &self.memory, &self.options)?;
        Ok(())
    }
}

impl PciSession {
    /// `RESET_SESSION` while the device is still live (with
    /// `options.reset_session`); best effort, a failure is logged.
    fn release_session(&self) {
        if !self.options.reset_session {
            return;
        }
        let d = &self.started.driver;
        let result = d
            .submit(CONTROLQ, &Request::ResetSession)
            .and_then(|ticket| d.complete_within(ticket, GOODBYE_TIMEOUT));
        if let Err(e) = result {
            log::warn!(
                "{}: RESET_SESSION before the reset: {e}",
                self.transport.function.address
            );
        }
    }
}

impl Drop for PciSession {
    /// Stops the device before the driver's rings and the DMA memory go.
    fn drop(&mut self) {
        self.release_session();
        if let Err(e) = self.transport.common.reset() {
            log::warn!("{}: reset on close: {e}", self.transport.function.address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes_round_down_to_a_power_of_two() {
        assert_eq!(power_of_two_floor(256), 256);
        assert_eq!(power_of_two_floor(1000), 512);
        assert_eq!(power_of_two_floor(1), 1);
        assert_eq!(power_of_two_floor(u16::MAX), 0x8000);
    }

    #[test]
    fn default_options_ask_for_both_ring_features() {
        let o = PciOptions::default();
        assert!(o.event_idx && o.indirect);
        assert!(o.dma_bytes.is_multiple_of(dma::HUGE_PAGE));
    }
}
