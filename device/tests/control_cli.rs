// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `ctl` command lines (contract section 11) parse into the requests the
//! control socket expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use vhost_device_dmabuf::control::{CtlArgs, CtlCommand, Request, DEFAULT_EVICT_TIMEOUT_MS};

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    ctl: CtlArgs,
}

fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
    let argv = ["ctl", "--control-socket", "/run/dmabuf.ctl"]
        .into_iter()
        .chain(args.iter().copied());
    Cli::try_parse_from(argv).map(|c| c.ctl)
}

#[test]
fn list_and_stats_take_json_before_or_after_the_command() {
    let a = parse(&["list", "--json"]).unwrap();
    assert!(a.json);
    assert_eq!(a.command.to_request(), Request::List {});
    let a = parse(&["--json", "stats"]).unwrap();
    assert!(a.json);
    assert_eq!(a.command.to_request(), Request::Stats {});
    assert!(!parse(&["list"]).unwrap().json);
}

#[test]
fn export_takes_fd_from_dynamic_read_only_and_a_guest_list() {
    let a = parse(&[
        "export",
        "cam0",
        "--fd-from",
        "/tmp/buf",
        "--dynamic",
        "--read-only",
        "--guests",
        "0,1",
    ])
    .unwrap();
    assert!(
        matches!(&a.command, CtlCommand::Export { fd_from, .. } if fd_from.to_str() == Some("/tmp/buf"))
    );
    assert_eq!(
        a.command.to_request(),
        Request::Export {
            name: "cam0".into(),
            dynamic: true,
            read_only: true,
            guests: Some(vec![0, 1]),
        }
    );
    let a = parse(&["export", "cam0", "--fd-from", "/tmp/buf"]).unwrap();
    assert_eq!(
        a.command.to_request(),
        Request::Export {
            name: "cam0".into(),
            dynamic: false,
            read_only: false,
            guests: None,
        }
    );
    assert!(parse(&["export", "cam0"]).is_err(), "--fd-from is required");
}

#[test]
fn evict_waits_1000_ms_by_default() {
    let u = uuid::Uuid::new_v4();
    let s = u.to_string();
    let a = parse(&["evict", &s]).unwrap();
    assert_eq!(
        a.command.to_request(),
        Request::Evict {
            uuid: u,
            timeout_ms: DEFAULT_EVICT_TIMEOUT_MS
        }
    );
    assert_eq!(DEFAULT_EVICT_TIMEOUT_MS, 1000);
    let a = parse(&["evict", &s, "--timeout-ms", "5"]).unwrap();
    assert_eq!(
        a.command.to_request(),
        Request::Evict {
            uuid: u,
            timeout_ms: 5
        }
    );
    assert!(parse(&["evict", "not-a-uuid"]).is_err());
}

#[test]
fn revoke_takes_a_name_and_the_socket_is_required() {
    let a = parse(&["revoke", "cam0"]).unwrap();
    assert_eq!(
        a.command.to_request(),
        Request::Revoke {
            name: "cam0".into()
        }
    );
    assert!(Cli::try_parse_from(["ctl", "list"]).is_err());
}
