// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What travels on the control socket: requests, responses, limits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::exporter::GuestId;

/// Longest request line the daemon reads (newline excluded); a longer one
/// is answered with an error and skipped.
pub const MAX_LINE: usize = 64 * 1024;

/// Clients connected at once; one more is told so and disconnected.
pub const MAX_CLIENTS: usize = 64;

/// How long `evict` waits for the reservation lock unless told otherwise.
pub const DEFAULT_EVICT_TIMEOUT_MS: u64 = 1000;

/// One request line (`{"cmd": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every object (section 11, `list`).
    List {},
    /// Request counters and host syncs (section 11, `stats`).
    Stats {},
    /// Registers the buffer whose fd comes with this line (`SCM_RIGHTS`).
    Export {
        name: String,
        #[serde(default)]
        dynamic: bool,
        #[serde(default)]
        read_only: bool,
        /// Guests allowed to `OPEN` it; `null` or absent: every guest.
        #[serde(default)]
        guests: Option<Vec<GuestId>>,
    },
    /// Withdraws an export; holders get `REVOKED`.
    Revoke { name: String },
    /// Moves a dynamic object, waiting at most `timeout_ms` for its lock.
    Evict {
        uuid: uuid::Uuid,
        #[serde(default = "default_evict_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_evict_timeout_ms() -> u64 {
    DEFAULT_EVICT_TIMEOUT_MS
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // A derived Serialize of strings, numbers and a UUID cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// The `cmd` name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::List {} => "list",
            Request::Stats {} => "stats",
            Request::Export { .. } => "export",
            Request::Revoke { .. } => "revoke",
            Request::Evict { .. } => "evict",
        }
    }
}

/// `{"ok": true}` plus the fields of `payload` (an object).
pub(crate) fn ok(payload: Value) -> Value {
    let mut out = Map::new();
    out.insert("ok".into(), Value::Bool(true));
    if let Value::Object(fields) = payload {
        out.extend(fields);
    }
    Value::Object(out)
}

/// `{"ok": false, "error": message}`.
pub(crate) fn error(message: impl Into<String>) -> Value {
    let mut out = Map::new();
    out.insert("ok".into(), Value::Bool(false));
    out.insert("error".into(), Value::String(message.into()));
    Value::Object(out)
}

/// A response as one line, newline included.
pub(crate) fn response_line(response: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_line() {
        let requests = [
            Request::List {},
            Request::Stats {},
            Request::Export {
                name: "cam0".into(),
                dynamic: true,
                read_only: false,
                guests: Some(vec![0, 1]),
            },
            Request::Revoke {
                name: "cam0".into(),
            },
            Request::Evict {
                uuid: uuid::Uuid::from_u128(0x1234),
                timeout_ms: 5,
            },
        ];
        for r in requests {
            let line = r.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            let back: Request = serde_json::from_slice(&line).expect("parses");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let r: Request = serde_json::from_str(r#"{"cmd":"export","name":"a"}"#).expect("parses");
        assert_eq!(
            r,
            Request::Export {
                name: "a".into(),
                dynamic: false,
                read_only: false,
                guests: None
            }
        );
        let u = uuid::Uuid::from_u128(7);
        let r: Request =
            serde_json::from_str(&format!(r#"{{"cmd":"evict","uuid":"{u}"}}"#)).expect("parses");
        assert_eq!(
            r,
            Request::Evict {
                uuid: u,
                timeout_ms: DEFAULT_EVICT_TIMEOUT_MS
            }
        );
    }

    #[test]
    fn unknown_commands_and_fields_are_errors() {
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"revoke","name":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"name":"a"}"#).is_err());
    }

    #[test]
    fn ok_adds_the_flag_to_the_payload() {
        let v = ok(serde_json::json!({"uuid": "u"}));
        assert_eq!(v, serde_json::json!({"ok": true, "uuid": "u"}));
        assert_eq!(error("no"), serde_json::json!({"ok": false, "error": "no"}));
    }
}
