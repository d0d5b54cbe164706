// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A first check of the virtio-pci transport inside a real guest: open the
//! device from user space, `GET_INFO`, move bytes to an object and back,
//! read them through shared memory region 0 where there is one, drive the
//! controlq from several threads, reset, and open a second session.
//!
//! ```text
//! pci_smoke [--address DDDD:BB:DD.F] [--no-event-idx] [--no-indirect] [--bytes N]
//!           [--calls N]     (GET_INFO calls per thread, 4 threads; default 25)
//! ```
//!
//! Needs root, `uio` and `uio_pci_generic` loaded and a few 2 MiB huge
//! pages reserved. The last line is `PCI-SMOKE OK` or `PCI-SMOKE FAILED: why`.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use dmabuf_guest_tests::pci::{PciOptions, PciSession, PciTransport};
use virtio_dmabuf_protocol::{caps, Direction, Request};

type Res<T> = Result<T, Box<dyn Error>>;

struct Args {
    options: PciOptions,
    bytes: usize,
    calls: usize,
}

fn parse_args() -> Res<Args> {
    let mut options = PciOptions::default();
    let mut bytes = 256 << 10;
    let mut calls = 25;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--address" => options.address = Some(args.next().ok_or("--address needs a value")?),
            "--no-event-idx" => options.event_idx = false,
            "--no-indirect" => options.indirect = false,
            "--bytes" => bytes = args.next().ok_or("--bytes needs a value")?.parse()?,
            "--calls" => calls = args.next().ok_or("--calls needs a value")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(Args {
        options,
        bytes,
        calls,
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn describe(s: &PciSession) -> Res<()> {
    let t = s.transport();
    let f = t.function();
    println!(
        "device {} {:04x}:{:04x} (virtio id {:?}), driver {:?}, {}",
        f.address,
        f.vendor,
        f.device,
        f.virtio_id(),
        f.driver(),
        t.uio_path().display()
    );
    let c = t.caps();
    println!(
        "caps: common {:?}, notify {:?} x{}, isr {:?}, device {:?}, shm {:?}",
        c.common, c.notify.region, c.notify.notify_off_multiplier, c.isr, c.device, c.shm
    );
    println!(
        "features offered {:#x}, negotiated {:#x}",
        s.offered_features(),
        s.features()
    );
    println!("driver: {:?}", s.driver().config());
    let shown = s.config_size().min(24) as usize;
    println!(
        "config: {} bytes in the DEVICE cap, first {shown}: {:02x?}",
        s.config_size(),
        s.read_config(0, shown)?
    );
    println!("shm region 0: {:?} bytes", s.shm_size());
    let m = s.memory();
    println!(
        "DMA memory: {} bytes of {}, ranges {:x?}",
        m.len(),
        m.page_kind(),
        m.ranges()
    );
    Ok(())
}

fn outcome<T>(
    what: &str,
    r: Result<Result<T, virtio_dmabuf_protocol::Status>, impl Error + 'static>,
) -> Res<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(status)) => Err(format!("{what}: device status {status}").into()),
        Err(e) => Err(format!("{what}: {e}").into()),
    }
}

fn transfers(s: &PciSession, bytes: usize, shm_live: bool) -> Res<()> {
    let d = s.driver();
    let size = (bytes as u64).next_multiple_of(4096);
    let obj = outcome("CREATE", d.create(size, 0))?;
    println!(
        "created object {} of {} bytes, flags {:#x}",
        obj.object, obj.size, obj.obj_flags
    );
    let data = pattern(bytes, 7);
    let t0 = Instant::now();
    // At most 64 KiB per request: a TCG guest's rings need not hold more.
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        outcome(
            "TRANSFER_TO_HOST",
            d.transfer_to_host(obj.object, (i * (64 << 10)) as u64, chunk),
        )?;
    }
    let mut back = Vec::with_capacity(bytes);
    for off in (0..bytes).step_by(64 << 10) {
        let len = (bytes - off).min(64 << 10) as u64;
        back.extend(outcome(
            "TRANSFER_FROM_HOST",
            d.transfer_from_host(obj.object, off as u64, len),
        )?);
    }
    if back != data {
        return Err("bytes read back differ from those written".into());
    }
    println!(
        "transfer: {bytes} bytes to the object and back, equal ({:?})",
        t0.elapsed()
    );

    if shm_live {
        if let Some(shm) = s.shm() {
            outcome(
                "BEGIN_CPU_ACCESS",
                d.begin_cpu_access(obj.object, Direction::Bidirectional),
            )?;
            let (offset, len) = outcome("MAP_SHM", d.map_shm(obj.object, true))?;
            println!(
                "MAP_SHM: window offset {offset:#x}, {len:#x} bytes (region {:#x})",
                shm.size()
            );
            let seen = shm.read(offset, bytes)?;
            if seen != data {
                return Err("the window does not show the object's bytes".into());
            }
            let stamp = b"written through the shm window";
            shm.write(offset + 4096, stamp)?;
            outcome(
                "END_CPU_ACCESS",
                d.end_cpu_access(obj.object, Direction::Bidirectional),
            )?;
            let got = outcome(
                "TRANSFER_FROM_HOST",
                d.transfer_from_host(obj.object, 4096, stamp.len() as u64),
            )?;
            if got != stamp {
                return Err(format!("window write not in the object: {got:02x?}").into());
            }
            outcome("UNMAP_SHM", d.unmap_shm(obj.object))?;
            println!("shm: the window shows the object, and a window write reached it");
        }
    }
    outcome("RELEASE", d.release(obj.object))?;
    Ok(())
}

/// Several threads on the request queues at once (thread `t` on the
/// `t`-th, round robin): completions and the one INTx line shared between
/// them.
fn threads(s: &PciSession, calls: usize) -> Res<()> {
    let d: &dmabuf_guest_tests::driver::Driver = s.driver();
    let queues = d.request_queues();
    let t0 = Instant::now();
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    thread::scope(|scope| {
        for t in 0..4 {
            let failures = failures.clone();
            let queue = queues[t % queues.len()];
            scope.spawn(move || {
                for i in 0..calls {
                    let r = d.call_on(queue, &Request::GetInfo);
                    if let Err(e) = outcome(&format!("GET_INFO on queue {queue}"), r) {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(format!("thread {t} call {i}: {e}"));
                        return;
                    }
                }
            });
        }
    });
    let failures = failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(f) = failures.first() {
        return Err(f.clone().into());
    }
    println!(
        "threads: 4 x {calls} GET_INFO on queues {queues:?} in {:?}, interrupts {:?}",
        t0.elapsed(),
        s.interrupts()
    );
    Ok(())
}

fn run() -> Res<()> {
    let Args {
        options,
        bytes,
        calls,
    } = parse_args()?;
    let t0 = Instant::now();
    let mut s = PciTransport::open(options.clone())?;
    println!("opened in {:?}", t0.elapsed());
    describe(&s)?;
    let info = outcome("GET_INFO", s.driver().get_info())?;
    println!("GET_INFO: {info:#?}");
    let shm_live = info.caps & caps::HOST_SHM != 0 && s.shm().is_some();
    transfers(&s, bytes, shm_live)?;
    threads(&s, calls)?;
    println!("interrupts so far: {:?}", s.interrupts());

    s.reset()?;
    let info2 = outcome("GET_INFO after reset", s.driver().get_info())?;
    println!("reset: GET_INFO again, version {}", info2.version);
    drop(s);

    let s2 = PciTransport::open(options)?;
    let info3 = outcome("GET_INFO in a second session", s2.driver().get_info())?;
    println!(
        "second session on {}: GET_INFO version {}, {} queues",
        s2.transport().function().address,
        info3.version,
        info3.num_queues
    );
    transfers(&s2, 4096, false)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("PCI-SMOKE OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut why = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                why.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!("PCI-SMOKE FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}
