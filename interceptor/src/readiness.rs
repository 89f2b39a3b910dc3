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
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
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
        self.with(|s| s.clone())
    }
}
