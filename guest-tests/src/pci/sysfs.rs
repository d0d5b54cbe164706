// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Finding the device under `/sys/bus/pci/devices`, handing it to
//! `uio_pci_generic`, and its PCI configuration space through the
//! `config` file.
//!
//! `uio_pci_generic` gives user space the device's INTx interrupt and
//! nothing else that matters here: its handler masks INTx with the command
//! register's interrupt-disable bit and counts the interrupt on
//! `/dev/uioN`; there is no `irqcontrol`, so user space unmasks by clearing
//! that bit itself. Closing `/dev/uioN` clears bus mastering, so the
//! driver keeps it open for as long as it uses the device and enables bus
//! mastering after opening it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device IDs are 0x1040 + the virtio device ID.
pub const DMABUF_DEVICE: u16 = 0x1040 + 37;
/// QEMU 10's stand-in: `vhost-user-gpio-pci` (virtio ID 41), section 1.
pub const GPIO_DEVICE: u16 = 0x1040 + 41;

const SYS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
const SYS_PCI_DRIVERS: &str = "/sys/bus/pci/drivers";
const DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";
const UIO_DRIVER: &str = "uio_pci_generic";

/// The command register and its bits.
const PCI_COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Interrupt disable is bit 10, bit 2 of the register's high byte.
const COMMAND_HIGH: u64 = PCI_COMMAND + 1;
const COMMAND_HIGH_INTX_DISABLE: u8 = 1 << 2;

/// A sysfs or device-node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no virtio-dmabuf PCI device ({VIRTIO_VENDOR:04x}:{DMABUF_DEVICE:04x} or \
         {VIRTIO_VENDOR:04x}:{GPIO_DEVICE:04x}) under {SYS_PCI_DEVICES}"
    )]
    NotFound,
    #[error("{0:?} is not a PCI address (like 0000:00:03.0)")]
    BadAddress(String),
    #[error("{address} is {vendor:04x}:{device:04x}, not a virtio device")]
    NotVirtio {
        address: String,
        vendor: u16,
        device: u16,
    },
    #[error("{path} holds {text:?}, not a hexadecimal ID")]
    BadId { path: PathBuf, text: String },
    #[error("{UIO_DRIVER} is not loaded (no {SYS_PCI_DRIVERS}/{UIO_DRIVER}): insmod uio.ko and uio_pci_generic.ko")]
    NoUioDriver,
    #[error("{address} is bound to {driver:?} after the probe, not {UIO_DRIVER}")]
    NotBound {
        address: String,
        driver: Option<String>,
    },
    #[error("{address}: {UIO_DRIVER} is bound but made no uio device (no IRQ?)")]
    NoUio { address: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SysfsError {
    let path = path.to_owned();
    move |source| SysfsError::Io { what, path, source }
}

/// `DDDD:BB:DD.F`, the form sysfs names devices by.
fn valid_address(address: &str) -> bool {
    let b = address.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The sysfs directory of the device at `address`.
pub fn device_dir(address: &str) -> PathBuf {
    Path::new(SYS_PCI_DEVICES).join(address)
}

fn read_id(path: &Path) -> Result<u16, SysfsError> {
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    let t = text.trim();
    u16::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| SysfsError::BadId {
        path: path.to_owned(),
        text: t.to_owned(),
    })
}

/// A PCI function as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub address: String,
    pub vendor: u16,
    pub device: u16,
}

impl PciFunction {
    /// Reads the IDs of the device at `address`.
    pub fn at(address: &str) -> Result<PciFunction, SysfsError> {
        if !valid_address(address) {
            return Err(SysfsError::BadAddress(address.to_owned()));
        }
        let dir = device_dir(address);
        Ok(PciFunction {
            address: address.to_owned(),
            vendor: read_id(&dir.join("vendor"))?,
            device: read_id(&dir.join("device"))?,
        })
    }

    /// Whether it is one of the two faces the device can have (section 1).
    pub fn is_dmabuf_candidate(&self) -> bool {
        self.vendor == VIRTIO_VENDOR && matches!(self.device, DMABUF_DEVICE | GPIO_DEVICE)
    }

    /// The virtio device ID behind a modern virtio-pci device ID.
    pub fn virtio_id(&self) -> Option<u16> {
        (self.vendor == VIRTIO_VENDOR && self.device >= 0x1040).then(|| self.device - 0x1040)
    }

    /// The driver bound now, if any.
    pub fn driver(&self) -> Option<String> {
        let link = fs::read_link(device_dir(&self.address).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }
}

/// Every candidate device, the real virtio-dmabuf ID before the stand-in,
/// then by address.
pub fn find_candidates() -> Result<Vec<PciFunction>, SysfsError> {
    let root = Path::new(SYS_PCI_DEVICES);
    let mut found = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err("listing", root))? {
        let entry = entry.map_err(io_err("listing", root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A device that vanishes or has odd files is simply not ours.
        if let Ok(f) = PciFunction::at(&name) {
            if f.is_dmabuf_candidate() {
                found.push(f);
            }
        }
    }
    found.sort_by_key(|f| (f.device != DMABUF_DEVICE, f.address.clone()));
    Ok(found)
}

/// The device at `address`, or the first candidate.
pub fn select(address: Option<&str>) -> Result<PciFunction, SysfsError> {
    match address {
        Some(a) => {
            let f = PciFunction::at(a)?;
            if f.virtio_id().is_none() {
                return Err(SysfsError::NotVirtio {
                    address: f.address,
                    vendor: f.vendor,
                    device: f.device,
                });
            }
            Ok(f)
        }
        None => find_candidates()?
            .into_iter()
            .next()
            .ok_or(SysfsError::NotFound),
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), SysfsError> {
    fs::write(path, text).map_err(io_err("writing", path))
}

/// Binds `f` to `uio_pci_generic` (unbinding `virtio-pci` or whatever
/// holds it) unless it already is, and returns its `/dev/uioN`.
pub fn bind_uio(f: &PciFunction) -> Result<PathBuf, SysfsError> {
    if !Path::new(SYS_PCI_DRIVERS).join(UIO_DRIVER).exists() {
        return Err(SysfsError::NoUioDriver);
    }
    let dir = device_dir(&f.address);
    match f.driver() {
        Some(d) if d == UIO_DRIVER => {}
        current => {
            if current.is_some() {
                write_file(&dir.join("driver/unbind"), &f.address)?;
            }
            write_file(&dir.join("driver_override"), UIO_DRIVER)?;
            write_file(Path::new(DRIVERS_PROBE), &f.address)?;
            let now = f.driver();
            if now.as_deref() != Some(UIO_DRIVER) {
                return Err(SysfsError::NotBound {
                    address: f.address.clone(),
                    driver: now,
                });
            }
        }
    }
    uio_node(f)
}

/// `/dev/uioN` of a device bound to `uio_pci_generic`, made from the
/// numbers in sysfs when no devtmpfs made it.
fn uio_node(f: &PciFunction) -> Result<PathBuf, SysfsError> {
    let uio_dir = device_dir(&f.address).join("uio");
    let no_uio = || SysfsError::NoUio {
        address: f.address.clone(),
    };
    let name = fs::read_dir(&uio_dir)
        .map_err(|_| no_uio())?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("uio"))
        .ok_or_else(no_uio)?;
    let node = Path::new("/dev").join(&name);
    if !node.exists() {
        let dev_file = uio_dir.join(&name).join("dev");
        let text = fs::read_to_string(&dev_file).map_err(io_err("reading", &dev_file))?;
        let bad = || SysfsError::BadId {
            path: dev_file.clone(),
            text: text.trim().to_owned(),
        };
        let (major, minor) = text.trim().split_once(':').ok_or_else(bad)?;
        let major: u32 = major.parse().map_err(|_| bad())?;
        let minor: u32 = minor.parse().map_err(|_| bad())?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(major, minor),
        )
        .map_err(|e| io_err("creating", &node)(e.into()))?;
    }
    Ok(node)
}

/// Opens `/dev/uioN` for interrupt counts (non-blocking: the notifier
/// polls it).
pub fn open_uio(node: &Path) -> Result<File, SysfsError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(node)
        .map_err(io_err("opening", node))
}

/// The device's PCI configuration space, through sysfs.
#[derive(Debug)]
pub struct ConfigSpace {
    file: File,
    path: PathBuf,
}

impl ConfigSpace {
    pub fn open(f: &PciFunction) -> Result<ConfigSpace, SysfsError> {
        let path = device_dir(&f.address).join("config");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        Ok(ConfigSpace { file, path })
    }

    /// The first `len` bytes (fewer if the space is smaller: 256 for a
    /// conventional function).
    pub fn read_all(&self, len: usize) -> Result<Vec<u8>, SysfsError> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.file.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading", &self.path)(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SysfsError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err("reading", &self.path))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), SysfsError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(io_err("writing", &self.path))
    }

    pub fn command(&self) -> Result<u16, SysfsError> {
        let mut b = [0u8; 2];
        self.read_at(&mut b, PCI_COMMAND)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Turns on memory space decoding and bus mastering, leaving the
    /// interrupt-disable bit as it is.
    pub fn enable_memory_and_bus_master(&self) -> Result<(), SysfsError> {
        let mut b = [0u8; 1];
        self.read_at(&mut b, PCI_COMMAND)?;
        let low = b[0] | (COMMAND_MEMORY | COMMAND_BUS_MASTER) as u8;
        self.write_at(&[low], PCI_COMMAND)
    }

    /// Clears the interrupt-disable bit that `uio_pci_generic`'s handler
    /// set. Only the command register's high byte is written, so the
    /// memory and bus master bits are never touched; the kernel masks only
    /// while the bit is clear, so the read-modify-write cannot undo a mask
    /// it raced with.
    pub fn unmask_intx(&self) -> Result<(), SysfsError> {
        let mut b = [0u8; 1];
        self.read_at(&mut b, COMMAND_HIGH)?;
        if b[0] & COMMAND_HIGH_INTX_DISABLE != 0 {
            self.write_at(&[b[0] & !COMMAND_HIGH_INTX_DISABLE], COMMAND_HIGH)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_have_the_sysfs_form() {
        assert!(valid_address("0000:00:03.0"));
        assert!(valid_address("0000:0a:1f.7"));
        assert!(!valid_address("00:03.0"));
        assert!(!valid_address("0000:00:03.0/../x"));
        assert!(!valid_address("0000-00:03.0"));
        assert!(!valid_address("../../../etc"));
    }

    #[test]
    fn candidates_are_the_dmabuf_id_and_the_gpio_stand_in() {
        let f = |device| PciFunction {
            address: "0000:00:03.0".into(),
            vendor: VIRTIO_VENDOR,
            device,
        };
        assert!(f(0x1065).is_dmabuf_candidate());
        assert!(f(0x1069).is_dmabuf_candidate());
        assert!(!f(0x1041).is_dmabuf_candidate());
        assert_eq!(f(0x1065).virtio_id(), Some(37));
        assert_eq!(f(0x1000).virtio_id(), None);
    }
}
