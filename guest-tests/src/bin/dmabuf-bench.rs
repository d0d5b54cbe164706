// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `dmabuf-bench`: the daemon's cost per request, each figure beside its
//! floor measured in the same run.
//!
//! The real daemon binary runs as its own process (next to this program,
//! or `$DMABUF_DAEMON`), and so does the floor, a null back-end on the same
//! vhost-user crates that answers every chain with an OK header
//! (`bench/null.rs`; this program started again with `--null-backend`).
//! Both get `--queues 2` and are driven the same way over their sockets by
//! the loopback VMM: requests written into guest RAM once, sent again with
//! a new tag, the driver sleeping on the call eventfd. Rounds alternate
//! daemon, null, daemon, null, so what the machine does meanwhile hits
//! both alike. Nothing here asserts on time; `docs/benchmarks.md` says
//! what each line measures.
//!
//! ```text
//! dmabuf-bench [--quick] [--json FILE] [--plots DIR] [--rounds N] [--objects N]
//!              [--modes unpinned,pinned,cross] [--lines scale,rtt,tput,bw,lock]
//! ```
//!
//! `--modes` and `--lines` run a part of the program (to profile one line,
//! say); without them it runs every line in every placement.

#[path = "../bench/mod.rs"]
mod bench;
#[path = "../soak/mod.rs"]
mod soak;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bench::{allowed_cpus, batch, percentile, set_affinity, Op, Patch, Prepared};
use dmabuf_guest_tests::driver::Ticket;
use dmabuf_guest_tests::vmm::{LoopbackVmm, VmmOptions};
use soak::{flag, Daemon};
use virtio_dmabuf_protocol::{
    create_flags, Direction, ObjectReply, Reply, Request, MAP_REPLY_FIXED_SIZE, RESP_HDR_SIZE,
    SEGMENT_SIZE,
};

/// Reply room of every prepared request but `TRANSFER_FROM_HOST`.
const ROOM: u32 = (RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE + 16 * SEGMENT_SIZE) as u32;
/// Requests in flight in the throughput lines.
const IN_FLIGHT: usize = 64;
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// `TRANSFER` sizes measured against `memcpy`.
const TRANSFER_SIZES: [usize; 3] = [64 * KIB, MIB, 8 * MIB];
/// Bytes of `TRANSFER`s kept in flight in the queued bandwidth lines (at
/// least two requests, at most 16).
const TRANSFER_QUEUED_BYTES: usize = 4 * MIB;

/// `TRANSFER`s of `size` in flight at once in the queued lines.
fn transfer_depth(size: usize) -> usize {
    (TRANSFER_QUEUED_BYTES / size).clamp(2, 16)
}
const REQUEST_QUEUES: u32 = 2;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Measured rounds per back-end (after one warm-up round each).
    rounds: usize,
    /// Round trips timed per round.
    trips: usize,
    /// Batches per throughput round.
    batches: usize,
    /// Copies per bandwidth round.
    copies: usize,
}

/// Every figure of the run, by its JSON key.
#[derive(Debug, Default)]
struct Figures(BTreeMap<String, f64>);

impl Figures {
    fn set(&mut self, key: impl Into<String>, value: f64) {
        self.0.insert(key.into(), value);
    }

    fn json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .0
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        serde_json::to_string_pretty(&serde_json::Value::Object(map)).unwrap_or_default()
    }
}

/// The null back-end, killed when dropped.
struct NullProcess {
    child: Child,
    socket: PathBuf,
}

impl NullProcess {
    fn start(dir: &Path) -> Result<NullProcess, String> {
        let socket = dir.join("null.sock");
        let _ = std::fs::remove_file(&socket);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .arg("--null-backend")
            .arg(&socket)
            .arg("--queues")
            .arg(REQUEST_QUEUES.to_string())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("null back-end: {e}"))?;
        let mut null = NullProcess { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !null.socket.exists() {
            if let Ok(Some(st)) = null.child.try_wait() {
                return Err(format!("the null back-end exited at start: {st}"));
            }
            if Instant::now() > deadline {
                return Err("the null back-end's socket did not appear in 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(null)
    }
}

impl Drop for NullProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vmm_options() -> VmmOptions {
    VmmOptions {
        ram: vec![(0, 256 << 20)],
        queue_size: 1024,
        timeout: bench::TIMEOUT,
        ..VmmOptions::default()
    }
}

/// One back-end under test: its VMM and its prepared operations.
struct Side {
    name: &'static str,
    vm: LoopbackVmm,
    queues: Vec<u16>,
    /// Round-trip lines, in print order.
    ops: Vec<Op>,
    /// `IN_FLIGHT` `GET_INFO`s per request queue.
    batches: Vec<Vec<Prepared>>,
    /// `TRANSFER_TO_HOST` and `TRANSFER_FROM_HOST` of each size.
    transfers: Vec<(usize, Op, Op)>,
    /// [`transfer_depth`] of each, to keep in flight, for each size.
    queued: Vec<(usize, Vec<Prepared>, Vec<Prepared>)>,
}

/// Handles the prepared requests name: real ones on the daemon, made by
/// typed calls; any number on the null back-end, which reads none.
#[derive(Debug, Clone, Copy, Default)]
struct Handles {
    object: u64,
    attachment: u64,
    cached_attachment: u64,
    cached_1g_attachment: u64,
    ctx: u64,
    transfer_objects: [u64; 3],
}

impl Handles {
    fn make(vm: &LoopbackVmm) -> Result<Handles, String> {
        let d = vm.driver();
        let create = |size: u64, flags: u32| -> Result<u64, String> {
            match d.create(size, flags) {
                Ok(Ok(o)) => Ok(o.object),
                other => Err(format!("CREATE {size}: {other:?}")),
            }
        };
        let attach = |object: u64| -> Result<u64, String> {
            match d.attach(object, 0) {
                Ok(Ok(a)) => Ok(a),
                other => Err(format!("ATTACH: {other:?}")),
            }
        };
        let object = create(4096, 0)?;
        let cached = create(4096, create_flags::CACHE_MAPPING)?;
        let cached_1g = create(1 << 30, create_flags::CACHE_MAPPING)?;
        let ctx = match d.acquire_init() {
            Ok(Ok((ctx, _))) => ctx,
            other => return Err(format!("ACQUIRE_INIT: {other:?}")),
        };
        let mut transfer_objects = [0; 3];
        for (o, size) in transfer_objects.iter_mut().zip(TRANSFER_SIZES) {
            *o = create(size as u64, 0)?;
        }
        Ok(Handles {
            object,
            attachment: attach(object)?,
            cached_attachment: attach(cached)?,
            cached_1g_attachment: attach(cached_1g)?,
            ctx,
            transfer_objects,
        })
    }
}

impl Side {
    fn new(name: &'static str, vm: LoopbackVmm, h: Handles) -> Side {
        let queues = vm.driver().request_queues();
        let p = |r: &Request| Prepared::new(&vm, r, ROOM);
        let release = Patch::new(
            0,
            |v| {
                Reply::Object(ObjectReply {
                    object: v,
                    uuid: [0; 16],
                    size: 0,
                    obj_flags: 0,
                })
            },
            |v| Request::Release { object: v },
        );
        let detach = Patch::new(0, Reply::Attachment, |v| Request::Detach { attachment: v });
        let unmap = Patch::new(
            0,
            |v| {
                Reply::Map(virtio_dmabuf_protocol::MapReply {
                    mapping: v,
                    generation: 0,
                    map_flags: 0,
                    space: virtio_dmabuf_protocol::AddressSpace::Object,
                    entries: Vec::new(),
                })
            },
            |v| Request::Unmap { mapping: v, ctx: 0 },
        );
        let map_unmap = |name, attachment| Op {
            name,
            steps: vec![
                p(&Request::Map {
                    attachment,
                    dir: Direction::Bidirectional,
                    max_entries: 16,
                    ctx: 0,
                }),
                p(&Request::Unmap { mapping: 0, ctx: 0 }).patched(unmap),
            ],
        };
        let dir = Direction::Bidirectional;
        let ops = vec![
            Op {
                name: "get_info",
                steps: vec![p(&Request::GetInfo)],
            },
            Op {
                name: "create_release",
                steps: vec![
                    p(&Request::Create {
                        size: 4096,
                        dynamic: false,
                        cache_mapping: false,
                        guest_pages: None,
                    }),
                    p(&Request::Release { object: 0 }).patched(release),
                ],
            },
            Op {
                name: "attach_detach",
                steps: vec![
                    p(&Request::Attach {
                        object: h.object,
                        dynamic_importer: false,
                        peer2peer: false,
                    }),
                    p(&Request::Detach { attachment: 0 }).patched(detach),
                ],
            },
            map_unmap("map_unmap_cached", h.cached_attachment),
            map_unmap("map_unmap_uncached", h.attachment),
            map_unmap("map_unmap_cached_1g", h.cached_1g_attachment),
            Op {
                name: "lock_unlock",
                steps: vec![
                    p(&Request::Lock {
                        ctx: h.ctx,
                        object: h.object,
                        try_lock: false,
                        slow: false,
                    }),
                    p(&Request::Unlock {
                        ctx: h.ctx,
                        object: h.object,
                    }),
                ],
            },
            Op {
                name: "begin_end_cpu_access",
                steps: vec![
                    p(&Request::BeginCpuAccess {
                        object: h.object,
                        dir,
                    }),
                    p(&Request::EndCpuAccess {
                        object: h.object,
                        dir,
                    }),
                ],
            },
        ];
        let batches = queues
            .iter()
            .map(|_| (0..IN_FLIGHT).map(|_| p(&Request::GetInfo)).collect())
            .collect();
        let transfers = TRANSFER_SIZES
            .iter()
            .zip(h.transfer_objects)
            .map(|(&size, object)| {
                let to = Op {
                    name: "transfer_to_host",
                    steps: vec![p(&Request::TransferToHost {
                        object,
                        offset: 0,
                        data: vec![0x5a; size],
                    })],
                };
                let from = Op {
                    name: "transfer_from_host",
                    steps: vec![Prepared::new(
                        &vm,
                        &Request::TransferFromHost {
                            object,
                            offset: 0,
                            len: size as u64,
                        },
                        (RESP_HDR_SIZE + size) as u32,
                    )],
                };
                (size, to, from)
            })
            .collect();
        let queued = TRANSFER_SIZES
            .iter()
            .zip(h.transfer_objects)
            .map(|(&size, object)| {
                // Each request in flight has buffers of its own.
                let depth = transfer_depth(size);
                let to = Request::TransferToHost {
                    object,
                    offset: 0,
                    data: vec![0x5a; size],
                };
                let from = Request::TransferFromHost {
                    object,
                    offset: 0,
                    len: size as u64,
                };
                let from_room = (RESP_HDR_SIZE + size) as u32;
                (
                    size,
                    (0..depth).map(|_| p(&to)).collect(),
                    (0..depth)
                        .map(|_| Prepared::new(&vm, &from, from_room))
                        .collect(),
                )
            })
            .collect();
        Side {
            name,
            vm,
            queues,
            ops,
            batches,
            transfers,
            queued,
        }
    }

    /// Every operation once, each answer checked.
    fn check(&self) -> Result<(), String> {
        for op in &self.ops {
            op.run(&self.vm, self.queues[0])
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
        for (_, to, from) in &self.transfers {
            to.run(&self.vm, self.queues[0])?;
            from.run(&self.vm, self.queues[0])?;
        }
        for (q, b) in self.queues.iter().zip(&self.batches) {
            batch(&self.vm, *q, b)?;
        }
        Ok(())
    }

    /// `n` round trips of `op`, each timed, in nanoseconds.
    fn trips(&self, op: &Op, n: usize, out: &mut Vec<f64>) -> Result<(), String> {
        for _ in 0..n {
            let t = Instant::now();
            op.run(&self.vm, self.queues[0])?;
            out.push(t.elapsed().as_nanos() as f64);
        }
        Ok(())
    }

    /// Requests per second with `IN_FLIGHT` in flight on each of the first
    /// `queues` request queues (one driver thread per queue).
    fn throughput(&self, queues: usize, batches: usize) -> Result<f64, String> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .queues
                .iter()
                .zip(&self.batches)
                .take(queues)
                .map(|(&q, b)| {
                    s.spawn(move || -> Result<(), String> {
                        for _ in 0..batches {
                            batch(&self.vm, q, b)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .map_err(|_| "a driver thread panicked".to_string())?
            })
        })?;
        Ok((queues * batches * IN_FLIGHT) as f64 / t.elapsed().as_secs_f64())
    }

    /// Seconds per run of `op`, the mean over `n`.
    fn seconds_per(&self, op: &Op, n: usize) -> Result<f64, String> {
        let t = Instant::now();
        for _ in 0..n {
            op.run(&self.vm, self.queues[0])?;
        }
        Ok(t.elapsed().as_secs_f64() / n as f64)
    }
}

/// Seconds per `memcpy` of `size` bytes between two buffers faulted in,
/// the mean over `n`.
fn memcpy_seconds(size: usize, n: usize) -> f64 {
    memcpy_rotating_seconds(size, n, 1)
}

/// Seconds per `memcpy` of `size` bytes into one buffer from each of
/// `sources` buffers in turn, all faulted in, the mean over `n`: the floor
/// of `sources` requests in flight, whose bytes are that many buffers
/// (what fits in the caches is the same on both sides).
fn memcpy_rotating_seconds(size: usize, n: usize, sources: usize) -> f64 {
    let srcs = vec![vec![0x5au8; size]; sources.max(1)];
    let mut dst = vec![0u8; size];
    for src in &srcs {
        dst.copy_from_slice(src);
    }
    let t = Instant::now();
    for i in 0..n {
        dst.copy_from_slice(black_box(&srcs[i % srcs.len()]));
        black_box(&mut dst);
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

/// The round trips of one operation, daemon and null, sorted, in ns.
struct Samples {
    op: &'static str,
    daemon: Vec<f64>,
    null: Vec<f64>,
}

/// Round-trip lines: p50 and p99 of each side, daemon over null at p50.
/// Returns every sample, for the plots.
fn round_trips(
    daemon: &Side,
    null: &Side,
    plan: Plan,
    mode: &str,
    figures: &mut Figures,
) -> Result<Vec<Samples>, String> {
    let mut samples = Vec::new();
    for (i, op) in daemon.ops.iter().enumerate() {
        let (mut d, mut n) = (Vec::new(), Vec::new());
        // Warm-up, thrown away.
        daemon.trips(op, plan.trips / 10 + 1, &mut Vec::new())?;
        null.trips(&null.ops[i], plan.trips / 10 + 1, &mut Vec::new())?;
        for _ in 0..plan.rounds {
            daemon.trips(op, plan.trips, &mut d)?;
            null.trips(&null.ops[i], plan.trips, &mut n)?;
        }
        d.sort_by(f64::total_cmp);
        n.sort_by(f64::total_cmp);
        let (d50, d99) = (percentile(&d, 50.0), percentile(&d, 99.0));
        let (n50, n99) = (percentile(&n, 50.0), percentile(&n, 99.0));
        let ratio = d50 / n50;
        println!(
            "rtt {mode} {}: p50 {} p99 {} (null: p50 {} p99 {}; ratio {ratio:.2})",
            op.name,
            us(d50),
            us(d99),
            us(n50),
            us(n99)
        );
        let key = format!("rtt.{}{}", op.name, suffix(mode));
        figures.set(format!("{key}.p50_ns"), d50);
        figures.set(format!("{key}.p99_ns"), d99);
        figures.set(format!("{key}.null_p50_ns"), n50);
        figures.set(format!("{key}.null_p99_ns"), n99);
        figures.set(format!("{key}.ratio_vs_null"), ratio);
        samples.push(Samples {
            op: op.name,
            daemon: d,
            null: n,
        });
    }
    let cached = |side: &str| {
        figures
            .0
            .get(&format!("rtt.{side}{}.p50_ns", suffix(mode)))
            .copied()
    };
    if let (Some(g), Some(k)) = (cached("map_unmap_cached_1g"), cached("map_unmap_cached")) {
        println!("cached MAP+UNMAP {mode}: 1 GiB over 4 KiB {:.2}", g / k);
        figures.set(format!("cached_map.ratio_1g_vs_4k{}", suffix(mode)), g / k);
    }
    Ok(samples)
}

/// Draws the round-trip distributions of one placement into `path` (SVG):
/// one panel per operation, the share of round trips at most a given
/// time (log scale), daemon beside null.
fn plot(path: &Path, mode: &str, samples: &[Samples]) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!(
                "dmabuf-bench: round trips, {mode} (share at most x µs; daemon red, null blue)"
            ),
            ("sans-serif", 18),
        )
        .map_err(|e| err(&e))?;
    let panels = body.split_evenly((2, samples.len().div_ceil(2).max(1)));
    for (panel, s) in panels.iter().zip(samples) {
        let all = s.daemon.iter().chain(&s.null).copied();
        let lo = all.clone().fold(f64::INFINITY, f64::min).max(100.0) / 1000.0;
        let hi = all.fold(0.0, f64::max) / 1000.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(s.op, ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(24)
            .y_label_area_size(32)
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(4)
            .y_labels(3)
            .draw()
            .map_err(|e| err(&e))?;
        for (values, color) in [(&s.daemon, RED), (&s.null, BLUE)] {
            // At most 400 points a line: the SVG stays small, the shape
            // the same.
            let n = values.len().max(1);
            let step = n.div_ceil(400);
            let points = values
                .iter()
                .enumerate()
                .filter(|(i, _)| i % step == 0 || i + 1 == n)
                .map(|(i, v)| (v / 1000.0, (i + 1) as f64 / n as f64));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The JSON key suffix of a mode: none for the unpinned figures users see.
fn suffix(mode: &str) -> String {
    if mode == "unpinned" {
        String::new()
    } else {
        format!(".{mode}")
    }
}

fn throughput(
    daemon: &Side,
    null: &Side,
    plan: Plan,
    mode: &str,
    figures: &mut Figures,
) -> Result<(), String> {
    let mut per_queues = Vec::new();
    for queues in [1, 2] {
        daemon.throughput(queues, plan.batches / 10 + 1)?;
        null.throughput(queues, plan.batches / 10 + 1)?;
        let (mut d, mut n) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            d.push(daemon.throughput(queues, plan.batches)?);
            n.push(null.throughput(queues, plan.batches)?);
        }
        let (d, n) = (median(d), median(n));
        println!(
            "tput {mode} get_info, {IN_FLIGHT} in flight on {queues} queue(s): {d:.0} requests/s (null: {n:.0}; ratio {:.2})",
            d / n
        );
        let key = format!("tput.get_info.q{queues}{}", suffix(mode));
        figures.set(format!("{key}.ops_per_s"), d);
        figures.set(format!("{key}.null_ops_per_s"), n);
        figures.set(format!("{key}.ratio_vs_null"), d / n);
        per_queues.push((d, n));
    }
    let (one, two) = (per_queues[0], per_queues[1]);
    println!(
        "tput {mode}: two queues over one {:.2} (null: {:.2})",
        two.0 / one.0,
        two.1 / one.1
    );
    figures.set(
        format!("tput.two_queues_over_one{}", suffix(mode)),
        two.0 / one.0,
    );
    figures.set(
        format!("tput.null_two_queues_over_one{}", suffix(mode)),
        two.1 / one.1,
    );
    Ok(())
}

fn bandwidth(daemon: &Side, plan: Plan, figures: &mut Figures) -> Result<(), String> {
    let queue = daemon.queues[0];
    let (mut one_at_a_time, mut in_flight) = (Vec::new(), Vec::new());
    for ((size, to, from), (_, to_queued, from_queued)) in
        daemon.transfers.iter().zip(&daemon.queued)
    {
        let size = *size;
        let depth = to_queued.len();
        let n = (plan.copies * MIB / size).clamp(4, 2000);
        let batches = (n / depth).max(2);
        // Seconds per request of `batches` batches of `depth` in flight.
        let queued = |prepared: &[Prepared]| -> Result<f64, String> {
            let t = Instant::now();
            for _ in 0..batches {
                batch(&daemon.vm, queue, prepared)?;
            }
            Ok(t.elapsed().as_secs_f64() / (batches * depth) as f64)
        };
        daemon.seconds_per(to, 2)?;
        daemon.seconds_per(from, 2)?;
        batch(&daemon.vm, queue, to_queued)?;
        batch(&daemon.vm, queue, from_queued)?;
        let (mut t, mut f, mut m) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tq, mut fq, mut mq) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            t.push(daemon.seconds_per(to, n)?);
            f.push(daemon.seconds_per(from, n)?);
            m.push(memcpy_seconds(size, n));
            tq.push(queued(to_queued)?);
            fq.push(queued(from_queued)?);
            mq.push(memcpy_rotating_seconds(size, batches * depth, depth));
        }
        let (t, f, m) = (median(t), median(f), median(m));
        let (tq, fq, mq) = (median(tq), median(fq), median(mq));
        let mibs = |s: f64| size as f64 / s / MIB as f64;
        let label = size_label(size);
        println!(
            "bw pinned transfer {label}, one at a time: to host {:.0} MiB/s, from host {:.0} MiB/s (memcpy {:.0} MiB/s; ratios {:.2}, {:.2})",
            mibs(t),
            mibs(f),
            mibs(m),
            m / t,
            m / f
        );
        println!(
            "bw pinned transfer {label}, {depth} in flight: to host {:.0} MiB/s, from host {:.0} MiB/s (memcpy from {depth} buffers {:.0} MiB/s; ratios {:.2}, {:.2})",
            mibs(tq),
            mibs(fq),
            mibs(mq),
            mq / tq,
            mq / fq
        );
        figures.set(format!("bw.memcpy.{label}.mib_per_s"), mibs(m));
        figures.set(format!("bw.memcpy.queued.{label}.mib_per_s"), mibs(mq));
        for (key, seconds, floor) in [
            (format!("bw.transfer.to_host.{label}"), t, m),
            (format!("bw.transfer.from_host.{label}"), f, m),
            (format!("bw.transfer.queued.to_host.{label}"), tq, mq),
            (format!("bw.transfer.queued.from_host.{label}"), fq, mq),
        ] {
            figures.set(format!("{key}.mib_per_s"), mibs(seconds));
            figures.set(format!("{key}.ratio_vs_memcpy"), floor / seconds);
        }
        figures.set(
            format!("bw.transfer.queued.{label}.in_flight"),
            depth as f64,
        );
        one_at_a_time.extend([m / t, m / f]);
        in_flight.extend([mq / tq, mq / fq]);
    }
    // The worst of each kind.
    let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    figures.set("bw.transfer.ratio_vs_memcpy", worst(&one_at_a_time));
    figures.set("bw.transfer.queued.ratio_vs_memcpy", worst(&in_flight));
    Ok(())
}

/// The label of a copy size in keys and lines: `64k`, `1m`, `8m`.
fn size_label(size: usize) -> String {
    if size >= MIB {
        format!("{}m", size / MIB)
    } else {
        format!("{}k", size / KIB)
    }
}

/// Bandwidth of the guest's direct access, daemon only, against `memcpy`
/// of the same size: writes into an object placed in the shared-memory
/// window (`MAP_SHM`, the front-end's side of the window, as the guest
/// writes through the BAR), and writes into and reads out of guest RAM
/// that a guest-pages object is made of. Neither goes through the daemon
/// per byte; the lines show that nothing sits between the guest and the
/// memory. Each object is checked once, outside the timing: a
/// `TRANSFER_FROM_HOST` reads back what was written, and what a
/// `TRANSFER_TO_HOST` wrote is read through the window and the guest
/// pages.
fn direct_bandwidth(daemon: &Side, plan: Plan, figures: &mut Figures) -> Result<(), String> {
    let vm = &daemon.vm;
    let d = vm.driver();
    let Some(shm) = vm.shm() else {
        println!("bw pinned shm: skipped: the front-end has no shared-memory window");
        return Ok(());
    };
    println!("bw pinned direct window read: skipped: the loopback VMM reads the window only into a buffer it allocates per read (ShmWindow::read), which a memcpy floor does not pay");
    for size in TRANSFER_SIZES {
        let n = (plan.copies * MIB / size).clamp(4, 2000);
        let label = size_label(size);
        let src: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let check = |object: u64| -> Result<(), String> {
            match d.transfer_from_host(object, (size - 64) as u64, 64) {
                Ok(Ok(bytes)) if bytes[..] == src[size - 64..] => Ok(()),
                other => Err(format!(
                    "{label}: the object does not hold what was written: {other:?}"
                )),
            }
        };
        // The other way: what the daemon writes into the object is what
        // the guest reads.
        let marker = [0xa5u8; 64];
        let check_read = |object: u64, read: &dyn Fn() -> Result<Vec<u8>, String>| {
            match d.transfer_to_host(object, 0, &marker) {
                Ok(Ok(())) => {}
                other => return Err(format!("{label}: TRANSFER_TO_HOST: {other:?}")),
            }
            match read() {
                Ok(bytes) if bytes == marker => Ok(()),
                other => Err(format!(
                    "{label}: the guest does not read what the daemon wrote: {other:?}"
                )),
            }
        };
        let object = match d.create(size as u64, 0) {
            Ok(Ok(o)) => o.object,
            other => return Err(format!("bw shm {label}: CREATE: {other:?}")),
        };
        let offset = match d.map_shm(object, true) {
            Ok(Ok((offset, _))) => offset,
            other => return Err(format!("bw shm {label}: MAP_SHM: {other:?}")),
        };
        let window = |k: usize| -> Result<f64, String> {
            let t = Instant::now();
            for _ in 0..k {
                shm.write(offset, black_box(&src))
                    .map_err(|e| e.to_string())?;
            }
            Ok(t.elapsed().as_secs_f64() / k as f64)
        };
        let buffer = d
            .pool()
            .alloc(size as u64, 4096)
            .map_err(|e| e.to_string())?;
        let segment = virtio_dmabuf_protocol::Segment {
            addr: buffer.gpa,
            len: size as u64,
        };
        let pages = match d.create_guest(size as u64, false, &[segment]) {
            Ok(Ok(o)) => o.object,
            other => return Err(format!("bw guest pages {label}: CREATE: {other:?}")),
        };
        let ram = |k: usize| -> Result<f64, String> {
            let t = Instant::now();
            for _ in 0..k {
                d.memory()
                    .write(buffer.gpa, black_box(&src))
                    .map_err(|e| e.to_string())?;
            }
            Ok(t.elapsed().as_secs_f64() / k as f64)
        };
        let mut dst = vec![0u8; size];
        let mut ram_read = |k: usize| -> Result<f64, String> {
            let t = Instant::now();
            for _ in 0..k {
                d.memory()
                    .read(buffer.gpa, black_box(&mut dst))
                    .map_err(|e| e.to_string())?;
            }
            Ok(t.elapsed().as_secs_f64() / k as f64)
        };
        // Warm-up (the first writes fault the pages in), then the checks.
        window(2)?;
        ram(2)?;
        check(object)?;
        check(pages)?;
        check_read(object, &|| {
            shm.read(offset, marker.len()).map_err(|e| e.to_string())
        })?;
        check_read(pages, &|| {
            let mut bytes = vec![0u8; marker.len()];
            d.memory()
                .read(buffer.gpa, &mut bytes)
                .map_err(|e| e.to_string())?;
            Ok(bytes)
        })?;
        ram_read(2)?;
        let (mut w, mut g, mut r, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            w.push(window(n)?);
            g.push(ram(n)?);
            r.push(ram_read(n)?);
            m.push(memcpy_seconds(size, n));
        }
        let (w, g, r, m) = (median(w), median(g), median(r), median(m));
        let mibs = |s: f64| size as f64 / s / MIB as f64;
        println!(
            "bw pinned direct {label}: window {:.0} MiB/s, guest pages {:.0} MiB/s (memcpy {:.0} MiB/s; ratios {:.2}, {:.2})",
            mibs(w),
            mibs(g),
            mibs(m),
            m / w,
            m / g
        );
        figures.set(format!("bw.shm.{label}.mib_per_s"), mibs(w));
        figures.set(format!("bw.shm.{label}.ratio_vs_memcpy"), m / w);
        figures.set(format!("bw.guest_pages.{label}.mib_per_s"), mibs(g));
        figures.set(format!("bw.guest_pages.{label}.ratio_vs_memcpy"), m / g);
        println!(
            "bw pinned direct read {label}: guest pages {:.0} MiB/s (memcpy {:.0} MiB/s; ratio {:.2})",
            mibs(r),
            mibs(m),
            m / r
        );
        figures.set(format!("bw.guest_pages.read.{label}.mib_per_s"), mibs(r));
        figures.set(
            format!("bw.guest_pages.read.{label}.ratio_vs_memcpy"),
            m / r,
        );
        let done = [
            d.unmap_shm(object).map_err(|e| e.to_string())?,
            d.release(object).map_err(|e| e.to_string())?,
            d.release(pages).map_err(|e| e.to_string())?,
        ];
        if let Some(status) = done.iter().find_map(|r| r.err()) {
            return Err(format!("bw {label}: cleaning up: {status:?}"));
        }
        d.pool().free(buffer);
    }
    for line in ["shm", "guest_pages"] {
        let worst = figures
            .0
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("bw.{line}.")) && k.ends_with(".ratio_vs_memcpy")
            })
            .map(|(_, v)| *v)
            .fold(f64::INFINITY, f64::min);
        figures.set(format!("bw.{line}.ratio_vs_memcpy"), worst);
    }
    Ok(())
}

/// Acquire contexts of the lock line, half on each of two request queues.
const LOCK_CONTEXTS: usize = 4;
/// Objects the lock line's contexts contend for.
const LOCK_OBJECTS: usize = 16;

/// Lock contention (daemon only: the null back-end has no locks).
/// `LOCK_CONTEXTS` acquire contexts lock objects picked at random among
/// `LOCK_OBJECTS`, each held for its `UNLOCK`'s round trip: one driver
/// thread per request queue (the first two), each keeping a request of
/// each of its contexts in flight, so all four contend at once. A `LOCK`
/// of an object another context holds parks in the daemon until that
/// `UNLOCK`. A context asks for a lock only when it holds none, and a
/// context that holds no lock never dies (spec 7.4): an `EDEADLK` here is
/// a broken contract and ends the run. An acquisition's wait runs from
/// the `LOCK`'s submission to its answer; the line gives acquisitions per
/// second and the longest wait over the mean (starvation shows as a long
/// tail).
fn lock_contention(
    daemon: &Side,
    mode: &str,
    per_thread: usize,
    figures: &mut Figures,
) -> Result<(), String> {
    let d = daemon.vm.driver();
    let mut objects = Vec::with_capacity(LOCK_OBJECTS);
    for _ in 0..LOCK_OBJECTS {
        match d.create(4096, 0) {
            Ok(Ok(o)) => objects.push(o.object),
            other => return Err(format!("lock line: CREATE: {other:?}")),
        }
    }
    let mut contexts = Vec::with_capacity(LOCK_CONTEXTS);
    for _ in 0..LOCK_CONTEXTS {
        match d.acquire_init() {
            Ok(Ok((ctx, _))) => contexts.push(ctx),
            other => return Err(format!("lock line: ACQUIRE_INIT: {other:?}")),
        }
    }
    let queues: Vec<u16> = daemon.queues.iter().copied().take(2).collect();
    let per_queue = LOCK_CONTEXTS / queues.len().max(1);
    let t = Instant::now();
    let waits: Vec<Vec<(u64, f64)>> = std::thread::scope(|s| {
        let threads: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, &queue)| {
                let mine = &contexts[i * per_queue..(i + 1) * per_queue];
                let objects = &objects;
                s.spawn(move || lock_loop(&daemon.vm, queue, mine, objects, per_thread, i))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| "a lock thread panicked".to_string())?)
            .collect::<Result<_, String>>()
    })?;
    let seconds = t.elapsed().as_secs_f64();
    let waits: Vec<(u64, f64)> = waits.into_iter().flatten().collect();
    // Per context: starvation would show as one context's waits far
    // longer than the others'.
    let by_context: Vec<(f64, f64)> = contexts
        .iter()
        .map(|&ctx| {
            let mine: Vec<f64> = waits.iter().filter(|w| w.0 == ctx).map(|w| w.1).collect();
            let mean = mine.iter().sum::<f64>() / mine.len().max(1) as f64;
            (mean, mine.iter().copied().fold(0.0, f64::max))
        })
        .collect();
    let means = by_context.iter().map(|c| c.0);
    let spread = means.clone().fold(0.0, f64::max) / means.fold(f64::INFINITY, f64::min);
    let mut all: Vec<f64> = waits.iter().map(|w| w.1).collect();
    all.sort_by(f64::total_cmp);
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let max = all.last().copied().unwrap_or(f64::NAN);
    let rate = all.len() as f64 / seconds;
    println!(
        "lock {mode}: {} contexts on {} queues over {} objects: {rate:.0} acquisitions/s, wait mean {} p99 {} max {} (max over mean {:.1})",
        contexts.len(),
        queues.len(),
        objects.len(),
        us(mean),
        us(percentile(&all, 99.0)),
        us(max),
        max / mean
    );
    println!(
        "lock {mode}: by context, wait mean {} and longest {} (slowest context's mean over the fastest's {spread:.2})",
        by_context
            .iter()
            .map(|c| us(c.0))
            .collect::<Vec<_>>()
            .join(", "),
        by_context
            .iter()
            .map(|c| us(c.1))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let key = format!("lock{}", suffix(mode));
    figures.set(format!("{key}.context_mean_spread"), spread);
    figures.set(format!("{key}.acquire_per_s"), rate);
    figures.set(format!("{key}.max_wait_over_mean"), max / mean);
    figures.set(format!("{key}.mean_wait_ns"), mean);
    figures.set(format!("{key}.max_wait_ns"), max);
    figures.set(format!("{key}.p99_wait_ns"), percentile(&all, 99.0));
    for ctx in contexts {
        if !matches!(d.acquire_fini(ctx), Ok(Ok(()))) {
            return Err("lock line: ACQUIRE_FINI".into());
        }
    }
    for object in objects {
        if !matches!(d.release(object), Ok(Ok(()))) {
            return Err("lock line: RELEASE".into());
        }
    }
    Ok(())
}

/// One driver thread of the lock line: `n` acquisitions on `queue`, a
/// `LOCK` or an `UNLOCK` of each of `contexts` in flight at a time; the
/// wait of each acquisition, in nanoseconds.
fn lock_loop(
    vm: &LoopbackVmm,
    queue: u16,
    contexts: &[u64],
    objects: &[u64],
    n: usize,
    seed: usize,
) -> Result<Vec<(u64, f64)>, String> {
    /// A context's request in flight.
    struct InFlight {
        ctx: u64,
        object: u64,
        ticket: Ticket,
        sent: Instant,
        unlocking: bool,
    }
    let d = vm.driver();
    let mut waits = Vec::with_capacity(n);
    // xorshift: the same sequence every run, different per thread.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (seed as u64 + 1);
    let mut pick = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        objects[(x % objects.len() as u64) as usize]
    };
    let submit = |request: &Request| d.submit(queue, request).map_err(|e| e.to_string());
    let lock = |ctx: u64, object: u64| -> Result<InFlight, String> {
        let sent = Instant::now();
        let ticket = submit(&Request::Lock {
            ctx,
            object,
            try_lock: false,
            slow: false,
        })?;
        Ok(InFlight {
            ctx,
            object,
            ticket,
            sent,
            unlocking: false,
        })
    };
    let mut started = 0;
    let mut flying = Vec::with_capacity(contexts.len());
    for &ctx in contexts.iter().take(n) {
        flying.push(lock(ctx, pick())?);
        started += 1;
    }
    while !flying.is_empty() {
        let tickets: Vec<&Ticket> = flying.iter().map(|f| &f.ticket).collect();
        let (i, response) = bench::wait_any(vm, queue, &tickets)?;
        let (ctx, object) = (flying[i].ctx, flying[i].object);
        if !flying[i].unlocking {
            if let Err(status) = response {
                return Err(format!("LOCK of a context that holds no lock: {status:?}"));
            }
            waits.push((ctx, flying[i].sent.elapsed().as_nanos() as f64));
            flying[i].ticket = submit(&Request::Unlock { ctx, object })?;
            flying[i].unlocking = true;
        } else if let Err(status) = response {
            return Err(format!("UNLOCK: {status:?}"));
        } else if started < n {
            flying[i] = lock(ctx, pick())?;
            started += 1;
        } else {
            flying.swap_remove(i);
        }
    }
    Ok(waits)
}

/// The open-file hard limit of this process (the daemon inherits it).
fn nofile_hard() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the limit into `r`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_max
}

/// Open files of process `pid`.
fn open_files(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// Live objects: `count` 4 KiB objects made `IN_FLIGHT` at a time, the
/// daemon's resident set before and after, and the rate. The objects stay
/// for the rest of the run (the disconnect releases them).
fn scale(daemon: &Side, pid: u32, count: usize, figures: &mut Figures) -> Result<(), String> {
    let queue = daemon.queues[0];
    let creates: Vec<Prepared> = (0..IN_FLIGHT)
        .map(|_| {
            Prepared::new(
                &daemon.vm,
                &Request::Create {
                    size: 4096,
                    dynamic: false,
                    cache_mapping: false,
                    guest_pages: None,
                },
                ROOM,
            )
        })
        .collect();
    let rss = || soak::rss_of(pid);
    let before = rss()?;
    let t = Instant::now();
    let mut made = 0;
    while made < count {
        let n = (count - made).min(IN_FLIGHT);
        batch(&daemon.vm, queue, &creates[..n])?;
        made += n;
    }
    let seconds = t.elapsed().as_secs_f64();
    let after = rss()?;
    let per_object = (after.saturating_sub(before) * 1024) as f64 / count as f64;
    let open = open_files(pid)?;
    println!(
        "scale: {count} live objects of 4 KiB: {per_object:.0} bytes of daemon RSS each, {:.0} CREATEs/s, {open} open files in the daemon ({} allowed)",
        count as f64 / seconds,
        nofile_hard()
    );
    figures.set("scale.open_files", open as f64);
    figures.set("scale.objects", count as f64);
    figures.set("scale.bytes_per_object", per_object);
    figures.set("scale.create_per_s", count as f64 / seconds);
    Ok(())
}

/// Where the threads of this program (the driver) and of the two
/// back-ends run in each mode: `unpinned` anywhere, as users run them (the
/// scheduler decides, and on a VM a wake-up across CPUs costs tens of
/// microseconds, so this mode is bimodal); `pinned` all on one CPU (the
/// floor, no cross-CPU wake-up); `cross` the driver on one CPU and the
/// back-ends on another (every wake-up crosses).
fn place(mode: &str, cpus: &[usize], driver: u32, backends: &[u32]) -> Result<(), String> {
    let (d, b) = match (mode, cpus) {
        ("pinned", [first, ..]) => (vec![*first], vec![*first]),
        ("cross", [first, second, ..]) => (vec![*first], vec![*second]),
        _ => (cpus.to_vec(), cpus.to_vec()),
    };
    set_affinity(driver, &d)?;
    for &pid in backends {
        set_affinity(pid, &b)?;
    }
    Ok(())
}

/// The comma-separated values of `name`, each one of `known`; all of
/// `known` when the flag is not given.
fn chosen(args: &[String], name: &str, known: &[&str]) -> Result<Vec<String>, String> {
    let given = flag(args, name, String::new())?;
    if given.is_empty() {
        return Ok(known.iter().map(|k| k.to_string()).collect());
    }
    given
        .split(',')
        .map(|v| {
            if known.contains(&v) {
                Ok(v.to_string())
            } else {
                Err(format!("{name}: {v:?} is not one of {}", known.join(", ")))
            }
        })
        .collect()
}

fn run(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let lines = chosen(args, "--lines", &["scale", "rtt", "tput", "bw", "lock"])?;
    let line = |l: &str| lines.iter().any(|x| x == l);
    let json: Option<PathBuf> = flag(args, "--json", String::new())?
        .parse::<PathBuf>()
        .ok()
        .filter(|p| !p.as_os_str().is_empty());
    let plots: Option<PathBuf> = flag(args, "--plots", String::new())?
        .parse::<PathBuf>()
        .ok()
        .filter(|p| !p.as_os_str().is_empty());
    let plan = if quick {
        Plan {
            rounds: flag(args, "--rounds", 2)?,
            trips: 30,
            batches: 20,
            copies: 16,
        }
    } else {
        Plan {
            rounds: flag(args, "--rounds", 6)?,
            trips: 400,
            batches: 300,
            copies: 256,
        }
    };
    // Small memfd objects are extents of their guest's slabs and hold no
    // open file, so the count is not bounded by the open-file limit.
    let objects = flag(args, "--objects", if quick { 2000 } else { 100_000 })?.max(IN_FLIGHT);
    let max_objects = (objects + 64).to_string();
    let daemon = Daemon::start(
        1,
        &[
            "--queues",
            &REQUEST_QUEUES.to_string(),
            "--max-objects",
            &max_objects,
        ],
    )?;
    let null = NullProcess::start(&daemon.dir)?;
    let daemon_vm =
        LoopbackVmm::connect(&daemon.sockets[0], vmm_options()).map_err(|e| e.to_string())?;
    let null_vm = LoopbackVmm::connect(&null.socket, vmm_options()).map_err(|e| e.to_string())?;
    let handles = Handles::make(&daemon_vm)?;
    let d = Side::new("daemon", daemon_vm, handles);
    let n = Side::new("null", null_vm, Handles::default());
    // First, on a fresh heap: what the objects cost is not hidden in
    // memory the allocator kept from large requests.
    let mut figures = Figures::default();
    if line("scale") {
        scale(&d, daemon.pid(), objects, &mut figures)?;
    }
    d.check()?;
    n.check()?;
    let cpus = allowed_cpus();
    println!(
        "dmabuf-bench: daemon pid {} and null back-end pid {}, {} request queues, {} CPUs, {} rounds{}",
        daemon.pid(),
        null.child.id(),
        d.queues.len(),
        cpus.len(),
        plan.rounds,
        if quick { " (--quick: figures mean little)" } else { "" }
    );
    let backends = [daemon.pid(), null.child.id()];
    let all_modes: &[&str] = if cpus.len() > 1 {
        &["unpinned", "pinned", "cross"]
    } else {
        &["unpinned", "pinned"]
    };
    let modes = chosen(args, "--modes", all_modes)?;
    let mode = |m: &str| modes.iter().any(|x| x == m);
    for &m in all_modes.iter().filter(|m| mode(m)) {
        place(m, &cpus, 0, &backends)?;
        if line("rtt") {
            let samples = round_trips(&d, &n, plan, m, &mut figures)?;
            if let Some(dir) = &plots {
                let path = dir.join(format!("bench-rtt-{m}.svg"));
                plot(&path, m, &samples)?;
                println!("plot written to {}", path.display());
            }
        }
        if line("tput") {
            throughput(&d, &n, plan, m, &mut figures)?;
        }
    }
    // The copies are measured on one CPU: where a round trip wakes the
    // back-end decides small TRANSFERs unpinned (see the round trips).
    place("pinned", &cpus, 0, &backends)?;
    if line("bw") {
        bandwidth(&d, plan, &mut figures)?;
        direct_bandwidth(&d, plan, &mut figures)?;
    }
    let locks = if quick { 200 } else { 20_000 };
    for m in ["pinned", "unpinned"]
        .into_iter()
        .filter(|m| line("lock") && mode(m))
    {
        place(m, &cpus, 0, &backends)?;
        lock_contention(&d, m, locks, &mut figures)?;
    }
    if let Some(path) = json {
        std::fs::write(&path, figures.json() + "\n")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--null-backend") {
        let Some(socket) = args.get(i + 1) else {
            eprintln!("--null-backend needs a socket path");
            return ExitCode::FAILURE;
        };
        let queues = flag(&args, "--queues", REQUEST_QUEUES).unwrap_or(REQUEST_QUEUES);
        return match bench::null::serve(Path::new(socket), queues, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dmabuf-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmabuf-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
