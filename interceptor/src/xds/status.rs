//! What the xDS source tells `status`, `/config_dump` and metrics: the connection, the last
//! version and nonce of each type, the last NACK, how long applying the last push took.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    #[default]
    Connecting,
    Connected,
    /// Waiting before the next attempt, after `error`.
    Backoff,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TypeStatus {
    pub version: String,
    pub nonce: String,
    pub resources: usize,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    /// Decoded response to table in force, for this type's last push.
    #[serde(default)]
    pub last_apply_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdsStatus {
    pub server: String,
    pub protocol: String,
    pub connection: Connection,
    pub since_unix: u64,
    pub last_error: Option<String>,
    pub reconnects: u64,
    /// Every subscribed type was ACKed once on some stream: the table is istiod's.
    pub synced: bool,
    /// The table in force came from the persisted copy (istiod not reached since start).
    pub from_persisted: bool,
    /// By short type name: clusters, endpoints, names.
    pub types: BTreeMap<String, TypeStatus>,
    pub last_push_unix: u64,
    /// Decoded response to table in force, for the last push.
    pub last_apply_ms: f64,
}

/// Shared by the source (writer) and the admin endpoint (reader).
#[derive(Default)]
pub struct Status(Mutex<XdsStatus>);

impl Status {
    pub fn new(server: String, protocol: &str) -> Self {
        Self(Mutex::new(XdsStatus {
            server,
            protocol: protocol.to_string(),
            since_unix: now_unix(),
            ..Default::default()
        }))
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut XdsStatus) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn get(&self) -> XdsStatus {
        self.with(|s| s.clone())
    }

    pub fn connection(&self, c: Connection, error: Option<String>) {
        self.with(|s| {
            if c == Connection::Connecting && s.connection != Connection::Connecting {
                s.reconnects += 1;
            }
            s.connection = c;
            s.since_unix = now_unix();
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    pub fn accepted(&self, ty: &str, version: &str, nonce: &str, resources: usize, apply_ms: f64) {
        self.with(|s| {
            let t = s.types.entry(ty.to_string()).or_default();
            t.version = version.to_string();
            t.nonce = nonce.to_string();
            t.resources = resources;
            t.acks += 1;
            t.last_apply_ms = apply_ms;
            s.last_push_unix = now_unix();
            s.last_apply_ms = apply_ms;
            s.from_persisted = false;
        });
    }

    pub fn rejected(&self, ty: &str, nonce: &str, why: &str) {
        self.with(|s| {
            let t = s.types.entry(ty.to_string()).or_default();
            t.nonce = nonce.to_string();
            t.nacks += 1;
            t.last_nack = Some(why.to_string());
        });
    }
}
