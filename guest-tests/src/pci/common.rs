// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The common configuration structure (virtio 1.2 section 4.1.4.3) and
//! the initialisation sequence that goes through it (sections 3.1.1 and
//! 4.1.5).

use std::thread;
use std::time::{Duration, Instant};

use crate::driver::RingLayout;

use super::mmio::{MmioError, Region};

/// Register offsets of `struct virtio_pci_common_cfg`.
mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// The structure up to `queue_device`: what a 1.0 device has.
    pub const LEN: u64 = 0x38;
}

/// `device_status` bits (section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// Feature bits the driver knows (section 6).
pub mod feature {
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    /// vhost-user's `VHOST_USER_F_PROTOCOL_FEATURES`: between front-end
    /// and back-end only, never a guest feature; ignored if seen.
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// MSI-X "no vector": interrupts go to INTx (section 4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// How long a reset may take to read back 0.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to the common configuration.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error("the common configuration structure is {0:#x} bytes, needs {len:#x}", len = reg::LEN)]
    ShortCommon(u64),
    #[error("device status still {0:#x} {RESET_TIMEOUT:?} after writing 0 (reset)")]
    ResetTimeout(u8),
    #[error("device does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("device cleared FEATURES_OK: it refuses features {0:#x}")]
    FeaturesRefused(u64),
    #[error("queue {0} is not available (queue_size 0)")]
    QueueUnavailable(u16),
    #[error("device keeps MSI-X vector {got:#x} for {what}, not NO_VECTOR")]
    Vector { what: String, got: u16 },
    #[error("device status {0:#x} after DRIVER_OK: it failed or needs a reset")]
    DeviceFailed(u8),
}

/// Accessors for the common configuration structure.
#[derive(Debug, Clone)]
pub struct CommonCfg {
    r: Region,
}

impl CommonCfg {
    pub fn new(r: Region) -> Result<CommonCfg, InitError> {
        if r.len() < reg::LEN {
            return Err(InitError::ShortCommon(r.len()));
        }
        Ok(CommonCfg { r })
    }

    pub fn status(&self) -> Result<u8, MmioError> {
        self.r.read8(reg::DEVICE_STATUS)
    }

    pub fn set_status(&self, s: u8) -> Result<(), MmioError> {
        self.r.write8(reg::DEVICE_STATUS, s)
    }

    /// Adds `bit` to the status.
    fn add_status(&self, bit: u8) -> Result<(), MmioError> {
        self.set_status(self.status()? | bit)
    }

    pub fn config_generation(&self) -> Result<u8, MmioError> {
        self.r.read8(reg::CONFIG_GENERATION)
    }

    /// The most queues the device supports.
    pub fn num_queues(&self) -> Result<u16, MmioError> {
        self.r.read16(reg::NUM_QUEUES)
    }

    /// Writes 0 and waits until the status reads 0 (section 4.1.4.3.2: the
    /// reset is complete only then).
    pub fn reset(&self) -> Result<(), InitError> {
        self.set_status(0)?;
        let deadline = Instant::now() + RESET_TIMEOUT;
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(InitError::ResetTimeout(s));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Both 32-bit halves of the device's features.
    pub fn device_features(&self) -> Result<u64, MmioError> {
        let mut f = 0;
        for half in 0..2u32 {
            self.r.write32(reg::DEVICE_FEATURE_SELECT, half)?;
            f |= u64::from(self.r.read32(reg::DEVICE_FEATURE)?) << (32 * half);
        }
        Ok(f)
    }

    fn set_driver_features(&self, f: u64) -> Result<(), MmioError> {
        for half in 0..2u32 {
            self.r.write32(reg::DRIVER_FEATURE_SELECT, half)?;
            self.r
                .write32(reg::DRIVER_FEATURE, (f >> (32 * half)) as u32)?;
        }
        Ok(())
    }

    fn select(&self, queue: u16) -> Result<(), MmioError> {
        self.r.write16(reg::QUEUE_SELECT, queue)
    }

    /// The device's maximum size of `queue` and its `queue_notify_off`.
    pub fn queue_info(&self, queue: u16) -> Result<(u16, u16), MmioError> {
        self.select(queue)?;
        Ok((
            self.r.read16(reg::QUEUE_SIZE)?,
            self.r.read16(reg::QUEUE_NOTIFY_OFF)?,
        ))
    }

    /// Routes configuration interrupts to INTx.
    pub fn disable_config_vector(&self) -> Result<(), InitError> {
        self.r.write16(reg::CONFIG_MSIX_VECTOR, NO_VECTOR)?;
        match self.r.read16(reg::CONFIG_MSIX_VECTOR)? {
            NO_VECTOR => Ok(()),
            got => Err(InitError::Vector {
                what: "the configuration".into(),
                got,
            }),
        }
    }

    /// Tells the device where `queue`'s rings are, routes its interrupts
    /// to INTx and enables it (section 4.1.5.1.3).
    pub fn setup_queue(&self, queue: u16, ring: &RingLayout) -> Result<(), InitError> {
        self.select(queue)?;
        self.r.write16(reg::QUEUE_SIZE, ring.size)?;
        // 64-bit fields as two 32-bit writes, low half first (allowed by
        // section 4.1.3.1, and all QEMU's implementation accepts).
        for (at, gpa) in [
            (reg::QUEUE_DESC, ring.desc),
            (reg::QUEUE_DRIVER, ring.avail),
            (reg::QUEUE_DEVICE, ring.used),
        ] {
            self.r.write32(at, gpa as u32)?;
            self.r.write32(at + 4, (gpa >> 32) as u32)?;
        }
        self.r.write16(reg::QUEUE_MSIX_VECTOR, NO_VECTOR)?;
        match self.r.read16(reg::QUEUE_MSIX_VECTOR)? {
            NO_VECTOR => {}
            got => {
                return Err(InitError::Vector {
                    what: format!("queue {queue}"),
                    got,
                })
            }
        }
        self.r.write16(reg::QUEUE_ENABLE, 1)?;
        Ok(())
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then the features: `wanted` of what the
    /// device offers plus VERSION_1, which it must offer. Returns
    /// `(offered, negotiated)` once FEATURES_OK stuck.
    pub fn negotiate(&self, wanted: u64) -> Result<(u64, u64), InitError> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        let offered = self.device_features()?;
        if offered & feature::VERSION_1 == 0 {
            self.fail();
            return Err(InitError::NoVersion1(offered));
        }
        let accepted =
            (offered & wanted & !feature::VHOST_USER_PROTOCOL_FEATURES) | feature::VERSION_1;
        self.set_driver_features(accepted)?;
        self.add_status(status::FEATURES_OK)?;
        if self.status()? & status::FEATURES_OK == 0 {
            self.fail();
            return Err(InitError::FeaturesRefused(accepted));
        }
        Ok((offered, accepted))
    }

    /// Sets DRIVER_OK and checks the device did not give up.
    pub fn driver_ok(&self) -> Result<(), InitError> {
        self.add_status(status::DRIVER_OK)?;
        let s = self.status()?;
        if s & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 {
            return Err(InitError::DeviceFailed(s));
        }
        Ok(())
    }

    /// Marks the driver as given up (section 3.1.1 step 8); best effort.
    pub fn fail(&self) {
        if let Ok(s) = self.status() {
            let _ = self.set_status(s | status::FAILED);
        }
    }
}
