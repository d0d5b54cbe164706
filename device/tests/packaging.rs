// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The systemd units and the default environment file of `packaging/`
//! agree with the daemon: the unit's command line is one the daemon
//! accepts, the socket unit listens where the service serves, the file
//! limit covers the default quotas, and the hardening the unit promises is
//! there. (`packaging/ci-package.sh` runs `systemd-analyze verify` on the
//! installed units.)

use std::path::{Path, PathBuf};

use clap::Parser;
use vhost_device_dmabuf::args::Cli;
use vhost_device_dmabuf::daemon::{fd_budget, Config};

fn packaging(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` in a unit file, in order (comments skipped).
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn one(unit: &str, key: &str) -> String {
    let v = values(unit, key);
    assert_eq!(v.len(), 1, "{key}= once: {v:?}");
    v[0].clone()
}

/// `%t` and `%i` as systemd expands them for the system instance `vm1`.
fn expand(text: &str) -> String {
    text.replace("%t", "/run").replace("%i", "vm1")
}

/// `DAEMON_ARGS` of the example line in the default environment file.
fn example_daemon_args() -> Vec<String> {
    let env = packaging("default/vhost-device-dmabuf");
    let line = env
        .lines()
        .find_map(|l| l.strip_prefix("# DAEMON_ARGS=\""))
        .expect("an example DAEMON_ARGS line");
    line.trim_end_matches('"')
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn service() -> String {
    packaging("systemd/vhost-device-dmabuf@.service")
}

fn exec_start_config(daemon_args: &[String]) -> Config {
    let exec = expand(&one(&service(), "ExecStart"));
    let mut words: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
    assert_eq!(words.pop().as_deref(), Some("$DAEMON_ARGS"), "{exec}");
    assert_eq!(words[0], "/usr/bin/vhost-device-dmabuf");
    words.extend(daemon_args.iter().cloned());
    let cli = Cli::try_parse_from(&words).unwrap_or_else(|e| panic!("{exec}: {e}"));
    Config::try_from(cli.args).unwrap_or_else(|e| panic!("{exec}: {e}"))
}

#[test]
fn the_service_command_line_is_accepted_with_and_without_daemon_args() {
    for args in [Vec::new(), example_daemon_args()] {
        let config = exec_start_config(&args);
        assert_eq!(
            config.socket_paths,
            [PathBuf::from("/run/vhost-device-dmabuf/vm1.sock")],
            "the instance name chooses the socket"
        );
        assert_eq!(
            config.control_socket,
            Some(PathBuf::from("/run/vhost-device-dmabuf/vm1.ctl"))
        );
    }
    let env = packaging("default/vhost-device-dmabuf");
    assert!(env.lines().any(|l| l == "DAEMON_ARGS=\"\""), "{env}");
    assert!(env.lines().any(|l| l.starts_with("RUST_LOG=")), "{env}");
}

#[test]
fn the_socket_unit_listens_where_the_service_serves() {
    let socket = packaging("systemd/vhost-device-dmabuf@.socket");
    let listen = PathBuf::from(expand(&one(&socket, "ListenStream")));
    assert_eq!(exec_start_config(&[]).socket_paths, [listen]);
    // The socket must outlive the service: not inside a directory systemd
    // removes when the service stops.
    assert_eq!(one(&service(), "RuntimeDirectoryPreserve"), "yes");
}

#[test]
fn the_file_limit_covers_the_default_quotas() {
    let limit: u64 = one(&service(), "LimitNOFILE").parse().expect("a number");
    let needed = fd_budget(&exec_start_config(&[]));
    assert!(limit >= needed, "LimitNOFILE={limit} < {needed}");
}

#[test]
fn the_service_is_notify_type_and_hardened_as_documented() {
    let unit = service();
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("RuntimeDirectory", "vhost-device-dmabuf"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateNetwork", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("DevicePolicy", "closed"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(one(&unit, key), value, "{key}=");
    }
    assert_eq!(
        values(&unit, "DeviceAllow"),
        ["/dev/udmabuf rw", "char-dma_heap rw"]
    );
    assert_eq!(
        values(&unit, "SystemCallFilter"),
        ["@system-service", "~@privileged"]
    );
    assert_eq!(
        values(&unit, "EnvironmentFile"),
        [
            "-/etc/default/vhost-device-dmabuf",
            "-/etc/default/vhost-device-dmabuf-%i"
        ]
    );
}

#[test]
fn every_packaged_source_file_exists() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::fs::read_to_string(manifest.join("Cargo.toml")).expect("Cargo.toml");
    let mut seen = 0;
    for line in cargo.lines() {
        let Some(rest) = line.trim().strip_prefix("[\"../") else {
            continue;
        };
        let source = rest.split('"').next().expect("a quoted path");
        assert!(
            manifest.join("..").join(source).is_file(),
            "{source} is packaged but missing"
        );
        seen += 1;
    }
    assert!(seen >= 5, "the deb assets were found ({seen})");
    let scripts = manifest.join("../packaging/debian");
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(scripts.join(script)).expect(script);
        assert!(text.starts_with("#!/bin/sh\n"), "{script}");
    }
}

/// Every Rust and shell source of the workspace names its licence with
/// the SPDX identifier of the workspace's `license` field.
#[test]
fn every_source_file_carries_the_spdx_licence_line() {
    fn walk(dir: &std::path::Path, missing: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    walk(&path, missing);
                }
            } else if name.ends_with(".rs") || name.ends_with(".sh") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let head: String = text.lines().take(3).collect::<Vec<_>>().join("\n");
                if !head.contains("SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause") {
                    missing.push(path.display().to_string());
                }
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut missing = Vec::new();
    walk(&root, &mut missing);
    assert!(missing.is_empty(), "no SPDX line: {missing:?}");
}
