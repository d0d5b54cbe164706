// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon's control socket reached from inside a guest: the control
//! protocol's JSON lines (`docs/control.md`) over a byte stream the VMM
//! connects to the host, a serial port in the e2e lanes.
//!
//! A relay on the host (`examples/e2e_host_relay.rs`) passes each line to
//! the control socket and the answer back. Only `export` differs: a guest
//! cannot send an fd, so its line carries the buffer's bytes
//! (`contents_hex`) and the relay puts them in a memfd it sends with the
//! request, as `ctl export --fd-from` sends its file.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use serde_json::{json, Value};

use crate::host::{
    ExportOptions, HostAttachment, HostControl, HostFenceSource, HostLockHolder, HostObject,
    HostSync,
};

/// The field of an `export` line that carries the buffer's bytes.
pub const CONTENTS_FIELD: &str = "contents_hex";

/// How long an `evict` may wait for the reservation lock.
const EVICT_TIMEOUT_MS: u64 = 1000;

/// The host's control plane over a line channel.
pub struct LineHost<C> {
    channel: Mutex<(BufReader<C>, C)>,
}

impl<C> std::fmt::Debug for LineHost<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineHost").finish_non_exhaustive()
    }
}

impl LineHost<File> {
    /// The serial port at `path` (`/dev/ttyS1`), put in raw mode so the
    /// line discipline neither echoes nor rewrites bytes.
    pub fn serial(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        make_raw(&file)?;
        let reader = file.try_clone()?;
        Ok(LineHost::new(reader, file))
    }
}

impl<C: Read + Write> LineHost<C> {
    /// `reader` and `writer` are the two directions of one channel.
    pub fn new(reader: C, writer: C) -> Self {
        LineHost {
            channel: Mutex::new((BufReader::new(reader), writer)),
        }
    }

    /// Sends one request line and returns the answer's fields, or the
    /// daemon's error message.
    pub fn call(&self, request: &Value) -> Result<Value, String> {
        let mut channel = self.channel.lock().unwrap_or_else(PoisonError::into_inner);
        let (reader, writer) = &mut *channel;
        let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        writer
            .write_all(&line)
            .and_then(|()| writer.flush())
            .map_err(|e| format!("sending to the host: {e}"))?;
        let mut answer = String::new();
        loop {
            answer.clear();
            let n = reader
                .read_line(&mut answer)
                .map_err(|e| format!("reading the host's answer: {e}"))?;
            if n == 0 {
                return Err("the host link closed".into());
            }
            // Noise before the relay attached (a console, a modem line) is
            // not an answer.
            if answer.trim_start().starts_with('{') {
                break;
            }
        }
        let mut value: Value = serde_json::from_str(answer.trim())
            .map_err(|e| format!("the host's answer {answer:?}: {e}"))?;
        if value.get("ok").and_then(Value::as_bool) != Some(true) {
            return Err(value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused without a reason")
                .to_string());
        }
        if let Some(fields) = value.as_object_mut() {
            fields.remove("ok");
        }
        Ok(value)
    }
}

impl<C: Read + Write + Send> HostControl for LineHost<C> {
    fn evict(&self, uuid: [u8; 16]) -> Result<(), String> {
        let uuid = uuid::Uuid::from_bytes(uuid);
        self.call(&json!({"cmd": "evict", "uuid": uuid, "timeout_ms": EVICT_TIMEOUT_MS}))
            .map(drop)
    }

    fn export(
        &self,
        name: &str,
        fd: BorrowedFd<'_>,
        options: &ExportOptions,
    ) -> Result<(), String> {
        let contents = read_whole(fd).map_err(|e| format!("reading the buffer to export: {e}"))?;
        self.call(&json!({
            "cmd": "export",
            "name": name,
            "dynamic": options.dynamic,
            "read_only": options.read_only,
            "guests": options.guests,
            CONTENTS_FIELD: hex(&contents),
        }))
        .map(drop)
    }

    fn revoke(&self, name: &str) -> Result<(), String> {
        self.call(&json!({"cmd": "revoke", "name": name})).map(drop)
    }

    fn recent_syncs(&self) -> Result<Vec<HostSync>, String> {
        parse_syncs(&self.call(&json!({"cmd": "stats"}))?)
    }

    fn objects(&self) -> Result<Vec<HostObject>, String> {
        parse_objects(&self.call(&json!({"cmd": "list"}))?)
    }

    fn host_fences(&self) -> Result<HostFenceSource, String> {
        parse_host_fences(&self.call(&json!({"cmd": "stats"}))?)
    }

    /// The daemon is on the other side of the VM boundary.
    fn shares_our_kernel(&self) -> bool {
        false
    }
}

/// Every byte of the file behind `fd`, from offset 0.
fn read_whole(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut file = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Raw mode on a terminal: no echo, no line editing, no CR/LF rewriting.
fn make_raw(file: &File) -> io::Result<()> {
    // SAFETY: `termios` is plain data; tcgetattr fills it or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call and `t` is a valid termios.
    if unsafe { libc::tcgetattr(file.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `t` is a valid termios that cfmakeraw only rewrites.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: the fd is open and `t` a valid termios the call only reads.
    if unsafe { libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- the answers of `list` and `stats` ----

fn uuid_field(v: &Value) -> Result<[u8; 16], String> {
    v.get("uuid")
        .and_then(Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .map(|u| *u.as_bytes())
        .ok_or_else(|| format!("no uuid in {v}"))
}

fn u64_field(v: &Value, key: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("no {key} in {v}"))
}

fn array<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>, String> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no {key} array in {v}"))
}

fn host_object(o: &Value) -> Result<HostObject, String> {
    let attachments = array(o, "attachments")?
        .iter()
        .map(|a| {
            Ok(HostAttachment {
                guest: u64_field(a, "guest")? as usize,
                dynamic_importer: a.get("importer").and_then(Value::as_str) == Some("dynamic"),
                pins: u64_field(a, "pins")? as u32,
                mappings: u64_field(a, "mappings")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let lock_holder = match o.get("lock_holder") {
        Some(Value::Null) | None => None,
        Some(h) => Some(HostLockHolder {
            guest: h.get("guest").and_then(Value::as_u64).map(|g| g as usize),
            stamp: h.get("stamp").and_then(Value::as_u64),
        }),
    };
    Ok(HostObject {
        uuid: uuid_field(o)?,
        generation: u64_field(o, "generation")?,
        dynamic: o.get("exporter").and_then(Value::as_str) == Some("dynamic"),
        guests: array(o, "guests")?
            .iter()
            .filter_map(Value::as_u64)
            .map(|g| g as usize)
            .collect(),
        attachments,
        lock_holder,
        fences_pending: u64_field(o, "fences_pending")?,
    })
}

/// The objects of a `list` answer.
pub fn parse_objects(list: &Value) -> Result<Vec<HostObject>, String> {
    array(list, "objects")?.iter().map(host_object).collect()
}

/// The `recent_syncs` of a `stats` answer.
pub fn parse_syncs(stats: &Value) -> Result<Vec<HostSync>, String> {
    array(stats, "recent_syncs")?
        .iter()
        .map(|s| {
            Ok(HostSync {
                uuid: uuid_field(s)?,
                flags: u64_field(s, "flags")?,
                kernel: s
                    .get("kernel")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| format!("no kernel in {s}"))?,
                errno: s
                    .get("errno")
                    .and_then(Value::as_i64)
                    .and_then(|e| i32::try_from(e).ok()),
            })
        })
        .collect()
}

/// The `host_fences` of a `stats` answer.
pub fn parse_host_fences(stats: &Value) -> Result<HostFenceSource, String> {
    let h = stats
        .get("host_fences")
        .ok_or_else(|| format!("no host_fences in {stats}"))?;
    Ok(HostFenceSource {
        source: h.get("source").and_then(Value::as_str).map(str::to_owned),
        carries_errors: h
            .get("carries_errors")
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("no carries_errors in {h}"))?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn hex_round_trips_and_refuses_odd_input() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&bytes), "0001abff");
        assert_eq!(unhex("0001abff").unwrap(), bytes);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn a_call_skips_noise_and_strips_ok() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let host = LineHost::new(ours.try_clone().unwrap(), ours);
        let relay = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut w = theirs;
            w.write_all(b"login: \r\n{\"ok\":true,\"recent_syncs\":[]}\n")
                .unwrap();
            line
        });
        assert_eq!(host.recent_syncs().unwrap(), vec![]);
        let sent: Value = serde_json::from_str(&relay.join().unwrap()).unwrap();
        assert_eq!(sent, json!({"cmd": "stats"}));
    }

    #[test]
    fn a_refusal_is_the_daemons_message() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let host = LineHost::new(ours.try_clone().unwrap(), ours);
        let relay = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut w = theirs;
            w.write_all(b"{\"ok\":false,\"error\":\"object is pinned\"}\n")
                .unwrap();
        });
        assert_eq!(host.evict([1; 16]), Err("object is pinned".to_string()));
        relay.join().unwrap();
    }
}
