//! Readiness: the conditions `/healthz/ready` waits for (programs attached, a table in force,
//! listeners up), and whether a part of the daemon died. Written by the daemon's parts and its
//! supervisor, read by the admin endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What readiness waits for, and whether a part died.
#[derive(Default)]
pub struct Readiness {
    state: Mutex<ReadinessState>,
    /// Woken at every change (`wait_for`).
    changed: tokio::sync::Notify,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadinessState {
    /// Conditions and whether each is met.
    pub conditions: BTreeMap<String, bool>,
    /// A part that died, and why: never ready again.
    pub failed: Option<String>,
    pub stopping: bool,
}

impl ReadinessState {
    pub fn is_ready(&self) -> bool {
        !self.stopping && self.failed.is_none() && self.conditions.values().all(|ok| *ok)
    }

    /// Why not ready, for a person.
    pub fn reason(&self) -> String {
        if let Some(f) = &self.failed {
            return format!("a part died: {f}");
        }
        if self.stopping {
            return "stopping".into();
        }
        let waiting: Vec<&str> = self
            .conditions
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(c, _)| c.as_str())
            .collect();
        format!("waiting for {}", waiting.join(", "))
    }
}

impl Readiness {
    pub fn new(conditions: &[&str]) -> Arc<Self> {
        let r = Self::default();
        for c in conditions {
            r.set(c, false);
        }
        Arc::new(r)
    }

    fn with<T>(&self, f: impl FnOnce(&mut ReadinessState) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_waiters();
        out
    }

    /// Waits until `conditions` are all met, at most `wait`: Err with what is still missing
    /// (or why never: a part died, a stop began).
    pub async fn wait_for(
        &self,
        conditions: &[&str],
        wait: std::time::Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let state = self.state();
            if state.failed.is_some() || state.stopping {
                return Err(state.reason());
            }
            let missing: Vec<&str> = conditions
                .iter()
                .copied()
                .filter(|c| state.conditions.get(*c) != Some(&true))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(format!("waiting for {}", missing.join(", ")));
            }
        }
    }

    pub fn set(&self, condition: &str, ok: bool) {
        self.with(|s| s.conditions.insert(condition.to_string(), ok));
    }

    pub fn fail(&self, why: String) {
        self.with(|s| s.failed.get_or_insert(why).clone());
    }

    pub fn stopping(&self) {
        self.with(|s| s.stopping = true);
    }

    pub fn is_ready(&self) -> bool {
        self.with(|s| s.is_ready())
    }

    pub fn state(&self) -> ReadinessState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
