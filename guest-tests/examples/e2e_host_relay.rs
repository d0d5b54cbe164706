// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host end of the e2e lanes' control link: passes the control lines a
//! guest writes to its second serial port to the daemon's control socket,
//! and the answers back (`guest-tests/src/host_link.rs` is the guest end).
//!
//! ```text
//! qemu-system-x86_64 ... -serial mon:stdio \
//!     -chardev socket,id=hostctl,path=/tmp/hostctl.sock,server=on,wait=off -serial chardev:hostctl
//! e2e_host_relay --connect /tmp/hostctl.sock --control-socket /tmp/dmabuf.ctl
//! ```
//!
//! The relay connects to the socket the VMM listens on (retrying while the
//! VMM starts) and serves it until the VMM goes away. An `export` line carries the buffer's bytes
//! (`contents_hex`): the relay puts them in a memfd and sends that with the
//! request, as `ctl export --fd-from` would send a file.
#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dmabuf_guest_tests::host_link::{unhex, CONTENTS_FIELD};
use dmabuf_guest_tests::vmm::shm::memfd_with;
use serde_json::{json, Value};
use vhost_device_dmabuf::control::{call, Request};

fn answer(control: &std::path::Path, line: &str) -> Value {
    let mut value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("relay: not JSON: {e}")}),
    };
    let contents = value
        .as_object_mut()
        .and_then(|o| o.remove(CONTENTS_FIELD))
        .and_then(|v| v.as_str().map(str::to_owned));
    let request: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("relay: {e}")}),
    };
    let file = match (&request, contents) {
        (Request::Export { name, .. }, Some(hex)) => {
            let Some(bytes) = unhex(&hex) else {
                return json!({"ok": false, "error": "relay: contents are not hex"});
            };
            match memfd_with(name, &bytes) {
                Ok(f) => Some(f),
                Err(e) => return json!({"ok": false, "error": format!("relay: memfd: {e}")}),
            }
        }
        _ => None,
    };
    let fd = file.as_ref().map(std::os::fd::AsFd::as_fd);
    match call(control, &request, fd) {
        Ok(mut fields) => {
            if let Some(o) = fields.as_object_mut() {
                o.insert("ok".into(), Value::Bool(true));
            }
            fields
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut connect, mut control) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--connect" => connect = args.next().map(PathBuf::from),
            "--control-socket" => control = args.next().map(PathBuf::from),
            other => {
                eprintln!("e2e_host_relay: unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (Some(connect), Some(control)) = (connect, control) else {
        eprintln!("usage: e2e_host_relay --connect PATH --control-socket PATH");
        return ExitCode::FAILURE;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(&connect) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                eprintln!("e2e_host_relay: {}: {e}", connect.display());
                return ExitCode::FAILURE;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut writer = stream.try_clone().expect("a second handle on the stream");
    let mut served = 0u64;
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // Boot noise on the line may not be UTF-8; requests are.
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim();
        if !line.starts_with('{') {
            continue;
        }
        let mut out = serde_json::to_vec(&answer(&control, line)).expect("JSON");
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            break;
        }
        served += 1;
    }
    eprintln!("e2e_host_relay: served {served} request(s)");
    ExitCode::SUCCESS
}
