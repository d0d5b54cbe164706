// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What `dmabuf-reconnect` and `dmabuf-soak` share: the real daemon binary
//! as a child process, its control socket (JSON lines), and its fd count
//! and resident set read from `/proc`. Each program uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The daemon started for one run, killed when dropped.
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
    pub sockets: Vec<PathBuf>,
    pub control: PathBuf,
}

/// The daemon binary: `$DMABUF_DAEMON`, else next to this program
/// (`target/<profile>/`).
pub fn daemon_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DMABUF_DAEMON") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe
        .parent()
        .ok_or("no parent directory")?
        .join("vhost-device-dmabuf");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found (build it, or set DMABUF_DAEMON)",
            p.display()
        ))
    }
}

/// The daemon's stderr: appended to `$DMABUF_DAEMON_LOG`, else dropped.
fn daemon_log() -> Stdio {
    std::env::var_os("DMABUF_DAEMON_LOG")
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map_or_else(Stdio::null, Stdio::from)
}

impl Daemon {
    /// Starts the daemon with `guests` sockets and a control socket in a
    /// fresh directory, and waits until every socket exists.
    pub fn start(guests: usize, extra: &[&str]) -> Result<Daemon, String> {
        let bin = daemon_binary()?;
        let dir = std::env::temp_dir().join(format!("dmabuf-soak-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let base = dir.join("guest.sock");
        let control = dir.join("ctl.sock");
        let child = Command::new(&bin)
            .arg("--socket-path")
            .arg(&base)
            .arg("--socket-count")
            .arg(guests.to_string())
            .arg("--control-socket")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(daemon_log())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let sockets: Vec<PathBuf> = if guests == 1 {
            vec![base.clone()]
        } else {
            (0..guests)
                .map(|i| PathBuf::from(format!("{}{i}", base.display())))
                .collect()
        };
        let mut d = Daemon {
            child,
            dir,
            sockets,
            control,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(d.sockets.iter().all(|s| s.exists()) && d.control.exists()) {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(format!("daemon exited at start: {st}"));
            }
            if Instant::now() > deadline {
                return Err("daemon sockets did not appear within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open fds of the daemon process.
    pub fn fd_count(&self) -> Result<usize, String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .map_err(|e| format!("/proc/{}/fd: {e}", self.pid()))
    }

    /// The daemon's VmRSS in KiB.
    pub fn rss_kib(&self) -> Result<u64, String> {
        rss_of(self.pid())
    }

    /// One control request; the response's payload (`ok` must be true).
    pub fn ctl(&self, cmd: &str) -> Result<Value, String> {
        ctl_call(&self.control, cmd)
    }

    /// Objects `ctl list` shows.
    pub fn objects(&self) -> Result<usize, String> {
        let v = self.ctl("list")?;
        v["objects"]
            .as_array()
            .map(Vec::len)
            .ok_or_else(|| format!("list: no objects array: {v}"))
    }

    /// `ctl stats` requests: (all answered, answered OK), over every
    /// opcode.
    pub fn request_totals(&self) -> Result<(u64, u64), String> {
        let v = self.ctl("stats")?;
        let reqs = v["requests"]
            .as_object()
            .ok_or_else(|| format!("stats: no requests object: {v}"))?;
        let (mut all, mut ok) = (0, 0);
        for by_status in reqs.values() {
            for (status, n) in by_status.as_object().into_iter().flatten() {
                let n = n.as_u64().unwrap_or(0);
                all += n;
                if status == "OK" {
                    ok += n;
                }
            }
        }
        Ok((all, ok))
    }

    /// Waits up to `within` for `ctl list` to be empty; the count left.
    pub fn settle_objects(&self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            let n = self.objects()?;
            if n == 0 || Instant::now() > deadline {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `within` for the fd count to fall to `at_most`; the
    /// count seen last.
    pub fn settle_fds(&self, at_most: usize, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            let n = self.fd_count()?;
            if n <= at_most || Instant::now() > deadline {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The VmRSS of process `pid` in KiB.
pub fn rss_of(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".to_string())
}

/// `{"cmd": cmd}` on the control socket at `path`.
pub fn ctl_call(path: &Path, cmd: &str) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{}", serde_json::json!({ "cmd": cmd })).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("{cmd}: {e}: {line}"))?;
    if v["ok"] != Value::Bool(true) {
        return Err(format!("{cmd}: {v}"));
    }
    Ok(v)
}

/// A small deterministic generator (xorshift64*), so a seed replays a run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Parses `--name value` pairs into `(name, value)`.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()
            .map_err(|_| format!("{name}: bad value")),
    }
}
