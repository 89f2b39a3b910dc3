//! One supervisor owns the daemon's parts. A part is a future that runs for the daemon's whole
//! life; one that ends (an error, a panic, or simply returning) is a dead part: readiness goes
//! off at once, the others are shut down in reverse start order (capture first, so traffic
//! flows as if we had never run) and the daemon exits non-zero for systemd to restart it.
//! A stop signal shuts them down the same way and exits zero.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::task::{AbortHandle, Id, JoinSet};

use crate::readiness::Readiness;

type PartFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A started part, not yet owned by a supervisor.
pub struct Handle {
    name: &'static str,
    fut: PartFuture,
}

impl Handle {
    pub fn new(
        name: &'static str,
        fut: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Self {
        Self {
            name,
            fut: Box::pin(fut),
        }
    }

    /// A part made of several tasks (one accept loop per listener): it is dead when any of them
    /// ends.
    pub fn all<F>(name: &'static str, futs: impl IntoIterator<Item = F>) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut set = JoinSet::new();
        for f in futs {
            set.spawn(f);
        }
        Self::new(name, async move {
            match set.join_next().await {
                None => anyhow::bail!("no task to run"),
                Some(Ok(r)) => r,
                Some(Err(e)) => Err(panic_error(e)),
            }
            // Dropping `set` aborts the siblings.
        })
    }

    /// A part made of accept loops that never return on their own.
    pub fn loops<F>(name: &'static str, loops: impl IntoIterator<Item = F>) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self::all(
            name,
            loops.into_iter().map(move |l| async move {
                l.await;
                anyhow::bail!("{name}: loop ended")
            }),
        )
    }
}

fn panic_error(e: tokio::task::JoinError) -> anyhow::Error {
    if e.is_panic() {
        let p = e.into_panic();
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic)".into());
        anyhow::anyhow!("panicked: {msg}")
    } else {
        anyhow::anyhow!("cancelled")
    }
}

/// A part died.
#[derive(Debug, thiserror::Error)]
#[error("{part} died: {why}")]
pub struct Died {
    pub part: &'static str,
    pub why: String,
}

pub struct Supervisor {
    readiness: Arc<Readiness>,
    tasks: JoinSet<anyhow::Result<()>>,
    /// In start order.
    parts: Vec<(&'static str, AbortHandle)>,
}

impl Supervisor {
    pub fn new(readiness: Arc<Readiness>) -> Self {
        Self {
            readiness,
            tasks: JoinSet::new(),
            parts: Vec::new(),
        }
    }

    /// Starts owning `part`; it runs from now on.
    pub fn add(&mut self, part: Handle) {
        let abort = self.tasks.spawn(part.fut);
        tracing::debug!(part = part.name, "part started");
        self.parts.push((part.name, abort));
    }

    fn name_of(&self, id: Id) -> &'static str {
        self.parts
            .iter()
            .find(|(_, a)| a.id() == id)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Runs until `stop` resolves (Ok) or a part dies (Err), then shuts every part down.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), Died> {
        tokio::pin!(stop);
        let (outcome, ended) = tokio::select! {
            _ = &mut stop => {
                self.readiness.stopping();
                (Ok(()), None)
            }
            Some(ended) = self.tasks.join_next_with_id() => {
                let (id, why) = match ended {
                    Ok((id, Ok(()))) => (id, "ended".to_string()),
                    Ok((id, Err(e))) => (id, format!("{e:#}")),
                    Err(e) => (e.id(), format!("{:#}", panic_error(e))),
                };
                let part = self.name_of(id);
                self.readiness.fail(format!("{part}: {why}"));
                tracing::error!(part, %why, "a part of the daemon died: shutting down (capture first) to be restarted");
                (Err(Died { part, why }), Some(id))
            }
        };
        self.shutdown(ended, outcome.is_err()).await;
        outcome
    }

    /// Stops every part, the last started first, each gone before the next is told.
    async fn shutdown(&mut self, already_ended: Option<Id>, died: bool) {
        let parts = std::mem::take(&mut self.parts);
        let mut ended: Vec<Id> = already_ended.into_iter().collect();
        for (i, (name, abort)) in parts.iter().enumerate().rev() {
            if ended.contains(&abort.id()) {
                continue;
            }
            if i == 0 && died {
                // The first part (the admin endpoint) still says why, for a test to see.
                crate::fault::before_exit().await;
            }
            abort.abort();
            while let Some(done) = self.tasks.join_next_with_id().await {
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                ended.push(id);
                if id == abort.id() {
                    break;
                }
            }
            tracing::debug!(part = name, "part stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    struct Order(Arc<Mutex<Vec<&'static str>>>, &'static str);
    impl Drop for Order {
        fn drop(&mut self) {
            self.0.lock().unwrap().push(self.1);
        }
    }

    fn forever(log: &Arc<Mutex<Vec<&'static str>>>, name: &'static str) -> Handle {
        let guard = Order(log.clone(), name);
        Handle::new(name, async move {
            let _g = guard;
            std::future::pending::<()>().await;
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_panicking_part_turns_readiness_off_and_stops_the_rest_in_reverse_order() {
        let readiness = Readiness::new(&["listeners"]);
        readiness.set("listeners", true);
        assert!(readiness.is_ready());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut sup = Supervisor::new(readiness.clone());
        sup.add(forever(&log, "admin"));
        let started = Arc::new(AtomicUsize::new(0));
        let s2 = started.clone();
        sup.add(Handle::loops(
            "outbound",
            [async move {
                s2.fetch_add(1, Ordering::SeqCst);
                panic!("boom");
            }],
        ));
        sup.add(forever(&log, "capture"));
        let died = sup.run(std::future::pending()).await.unwrap_err();
        assert_eq!(died.part, "outbound");
        assert!(died.why.contains("boom"), "{}", died.why);
        assert!(!readiness.is_ready());
        assert!(readiness.state().reason().contains("outbound"));
        assert_eq!(*log.lock().unwrap(), vec!["capture", "admin"]);
    }

    #[tokio::test]
    async fn a_stop_signal_stops_every_part_and_is_not_a_failure() {
        let readiness = Readiness::new(&[]);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut sup = Supervisor::new(readiness.clone());
        sup.add(forever(&log, "a"));
        sup.add(forever(&log, "b"));
        sup.run(async {}).await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["b", "a"]);
        assert!(!readiness.is_ready());
        assert_eq!(readiness.state().reason(), "stopping");
    }
}
