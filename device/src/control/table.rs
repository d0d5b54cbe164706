// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The human-readable forms of `ctl list` and `ctl stats`.
//!
//! They read the JSON payload rather than the exporter's types, so the
//! client prints whatever a daemon of another build sends; a missing field
//! shows as `?`.

use serde_json::Value;

/// One line per object, like the kernel's `dma_buf/bufinfo`, then a total.
pub(crate) fn list(payload: &Value) -> String {
    let objects = payload
        .get("objects")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut rows = vec![[
        "UUID",
        "SIZE",
        "PROVIDER",
        "EXPORTER",
        "PLACEMENT",
        "GEN",
        "EXPORT",
        "GUESTS",
        "LOCK",
        "FENCES",
        "SHM",
        "ATTACHMENTS",
    ]
    .map(str::to_owned)
    .to_vec()];
    let mut bytes = 0u64;
    for o in objects {
        bytes = bytes.saturating_add(o.get("size").and_then(Value::as_u64).unwrap_or(0));
        let mut export = text(o.get("export"));
        if o.get("revoked").and_then(Value::as_bool) == Some(true) {
            export.push_str(" (revoked)");
        }
        rows.push(vec![
            text(o.get("uuid")),
            text(o.get("size")),
            text(o.get("provider")),
            text(o.get("exporter")),
            text(o.get("placement")),
            text(o.get("generation")),
            export,
            guests(o.get("guests")),
            lock_holder(o.get("lock_holder")),
            text(o.get("fences_pending")),
            shm(o),
            attachments(o.get("attachments")),
        ]);
    }
    let mut out = align(&rows);
    out.push_str(&format!("{} objects, {bytes} bytes\n", objects.len()));
    out
}

/// The SHM column: the window offset, `-` when not in the window, `copy`
/// when it cannot be (served through the copy path only).
fn shm(o: &Value) -> String {
    match o.get("shm_offset").and_then(Value::as_u64) {
        Some(off) => format!("{off:#x}"),
        None if o.get("window").and_then(Value::as_bool) == Some(false) => "copy".to_owned(),
        None => "-".to_owned(),
    }
}

/// Requests by opcode (one line each, `STATUS=count`), then host syncs by
/// flags, then how many recent syncs `--json` lists.
pub(crate) fn stats(payload: &Value) -> String {
    let mut rows = vec![vec!["OPCODE".to_owned(), "STATUS=COUNT".to_owned()]];
    if let Some(requests) = payload.get("requests").and_then(Value::as_object) {
        for (opcode, by_status) in requests {
            let counts = by_status
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(status, n)| format!("{status}={}", text(Some(n))))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "?".to_owned());
            rows.push(vec![opcode.clone(), counts]);
        }
    }
    let mut out = align(&rows);
    out.push('\n');
    let mut rows = vec![vec!["SYNC".to_owned(), "COUNT".to_owned()]];
    if let Some(syncs) = payload.get("syncs").and_then(Value::as_object) {
        for (flags, n) in syncs {
            rows.push(vec![flags.clone(), text(Some(n))]);
        }
    }
    out.push_str(&align(&rows));
    let recent = payload
        .get("recent_syncs")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    out.push_str(&format!(
        "\n{recent} recent host syncs (--json lists them)\n"
    ));
    if let Some(h) = payload.get("host_fences") {
        out.push_str(&host_fences(h));
    }
    out
}

/// The host fence source and its counters (`docs/protocol.md`, "Host
/// fences").
fn host_fences(h: &Value) -> String {
    let n = |key: &str| text(h.get(key));
    let source = match h.get("source").and_then(Value::as_str) {
        None => "none (guest fences stay in the device)".to_owned(),
        Some(name) => {
            let node = h.get("node").and_then(Value::as_str).unwrap_or("?");
            let errors = if h.get("carries_errors").and_then(Value::as_bool) == Some(true) {
                "carries errors"
            } else {
                "carries no errors"
            };
            let own = match h.get("source_timeout_ms").and_then(Value::as_u64) {
                Some(ms) => format!(", signals its fences itself after {ms} ms"),
                None => String::new(),
            };
            format!("{name} ({node}, {errors}{own})")
        }
    };
    format!(
        "\nhost fences: {source}\n  installed {} (failed {}), pending {}, signalled {} \
         (errors dropped {}, expired at the source {})\n  waits for host fences {} \
         (timed out {}), watching {}\n",
        n("installed"),
        n("install_failed"),
        n("pending"),
        n("signalled"),
        n("errors_dropped"),
        n("expired_at_source"),
        n("waits"),
        n("wait_timeouts"),
        n("watching"),
    )
}

/// Columns padded to their widest cell; the last one is not padded.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                out.push_str(cell);
            } else {
                let pad = widths[c].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    }
    out
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => "-".to_owned(),
        Some(v) => v.to_string(),
        None => "?".to_owned(),
    }
}

fn guests(v: Option<&Value>) -> String {
    match v.and_then(Value::as_array) {
        Some(list) if list.is_empty() => "-".to_owned(),
        Some(list) => list
            .iter()
            .map(|g| text(Some(g)))
            .collect::<Vec<_>>()
            .join(","),
        None => "?".to_owned(),
    }
}

/// `-`, `g1#5` (guest 1's context with stamp 5), `g1` (a guest request
/// without a context), or `host` (an eviction).
fn lock_holder(v: Option<&Value>) -> String {
    let Some(holder) = v.filter(|v| !v.is_null()) else {
        return "-".to_owned();
    };
    let guest = holder.get("guest").and_then(Value::as_u64);
    let stamp = holder.get("stamp").and_then(Value::as_u64);
    match (guest, stamp) {
        (Some(g), Some(s)) => format!("g{g}#{s}"),
        (Some(g), None) => format!("g{g}"),
        (None, _) => "host".to_owned(),
    }
}

/// The DMA direction a cached mapping was made for (`enum dma_data_direction`).
fn direction(v: Option<&Value>) -> String {
    match v.and_then(Value::as_u64) {
        Some(0) => "bidi".to_owned(),
        Some(1) => "to_device".to_owned(),
        Some(2) => "from_device".to_owned(),
        Some(n) => n.to_string(),
        None => "-".to_owned(),
    }
}

/// `g1 dynamic pins=0 cached=- maps=0; g0 static ...`.
fn attachments(v: Option<&Value>) -> String {
    let Some(list) = v.and_then(Value::as_array) else {
        return "?".to_owned();
    };
    if list.is_empty() {
        return "-".to_owned();
    }
    list.iter()
        .map(|a| {
            format!(
                "g{} {} pins={} cached={} maps={}",
                text(a.get("guest")),
                text(a.get("importer")),
                text(a.get("pins")),
                direction(a.get("cached_dir")),
                text(a.get("mappings")),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_shows_one_line_per_object_and_a_total() {
        let payload = json!({"objects": [{
            "uuid": "6f1c1a8e-0000-4000-8000-000000000001", "size": 8192,
            "provider": "dma-buf", "exporter": "dynamic", "placement": "host",
            "generation": 2, "export": "cam0", "revoked": false, "guests": [1],
            "attachments": [{"guest": 1, "importer": "dynamic", "pins": 1,
                             "cached_dir": 0, "mappings": 3}],
            "lock_holder": {"guest": 1, "stamp": 7}, "fences_pending": 0,
            "shm_offset": 4096
        }]});
        let out = list(&payload);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("UUID"));
        for part in [
            "6f1c1a8e-0000-4000-8000-000000000001",
            "8192",
            "dma-buf",
            "dynamic",
            "cam0",
            "g1#7",
            "0x1000",
            "g1 dynamic pins=1 cached=bidi maps=3",
        ] {
            assert!(lines[1].contains(part), "{part} missing from {}", lines[1]);
        }
        assert_eq!(lines[2], "1 objects, 8192 bytes");
    }

    #[test]
    fn stats_lists_statuses_per_opcode_and_syncs_by_flags() {
        let payload = json!({
            "requests": {"OPEN": {"OK": 2, "ENOENT": 1}},
            "syncs": {"START|READ": 4},
            "recent_syncs": [{"uuid": "u", "flags": 1}]
        });
        let out = stats(&payload);
        assert!(out.contains("OPEN"), "{out}");
        assert!(out.contains("ENOENT=1 OK=2") || out.contains("OK=2 ENOENT=1"));
        assert!(out.contains("START|READ  4"), "{out}");
        assert!(out.contains("1 recent host syncs"));
        assert!(!out.contains("host fences"), "{out}");
    }

    #[test]
    fn stats_shows_the_host_fence_source_and_its_counters() {
        let payload = json!({
            "requests": {}, "syncs": {}, "recent_syncs": [],
            "host_fences": {
                "source": "vgem", "node": "/dev/dri/card0", "carries_errors": false,
                "source_timeout_ms": 10000, "installed": 3, "install_failed": 0,
                "signalled": 2, "errors_dropped": 1, "expired_at_source": 0, "pending": 1,
                "waits": 4, "wait_timeouts": 1, "watching": 0
            }
        });
        let out = stats(&payload);
        assert!(
            out.contains("host fences: vgem (/dev/dri/card0, carries no errors, signals its fences itself after 10000 ms)"),
            "{out}"
        );
        assert!(
            out.contains("installed 3 (failed 0), pending 1, signalled 2"),
            "{out}"
        );
        assert!(
            out.contains("waits for host fences 4 (timed out 1)"),
            "{out}"
        );
        let none = stats(&json!({"host_fences": {"source": null}}));
        assert!(none.contains("host fences: none"), "{none}");
    }
}
