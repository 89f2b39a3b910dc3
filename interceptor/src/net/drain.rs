//! The process's drain on a stop: connections in progress get a short grace to end on their
//! own, then each is closed cleanly (TLS close_notify, HTTP/2 GOAWAY, FIN), and the process
//! waits for that before it exits. Without it, a stop cut every held connection with no
//! close_notify and every pooled HBONE connection with no GOAWAY, and peers logged each as an
//! error.
//!
//! One drain per process, not one per part: every connection task of the process must be
//! waited for, whichever listener or pool spawned it, so they all spawn through here.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Istio's default for the sidecar (`terminationDrainDuration`, 5 s).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// After the grace, how long the clean closes themselves may take.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

struct Drain {
    started: watch::Sender<Option<Duration>>,
    tasks: TaskTracker,
    /// Set once the listeners that relay bytes stop accepting (a hand-over to the next
    /// process: what arrives after waits in the kernel's queue for it).
    handed_over: watch::Sender<bool>,
}

static DRAIN: LazyLock<Drain> = LazyLock::new(|| Drain {
    started: watch::Sender::new(None),
    tasks: TaskTracker::new(),
    handed_over: watch::Sender::new(false),
});

/// From now on the relaying listeners accept nothing: connections wait in the kernel's accept
/// queue (kept open by systemd's store) for the next process.
pub fn stop_accepting() {
    DRAIN.handed_over.send_replace(true);
}

/// Resolves once `stop_accepting` was called (never, in a process that keeps accepting).
pub async fn accepting_stopped() {
    let mut rx = DRAIN.handed_over.subscribe();
    // An error means the sender is gone, which a static never is.
    let _ = rx.wait_for(|stopped| *stopped).await;
}

/// Spawns a task the drain waits for: a connection, or an HTTP/2 connection's driver.
pub fn spawn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    DRAIN.tasks.spawn(fut);
}

/// Resolves once a drain has begun (never, in a process that is not stopping).
pub async fn started() {
    let mut rx = DRAIN.started.subscribe();
    // An error means the sender is gone, which a static never is.
    let _ = rx.wait_for(Option::is_some).await;
}

/// Resolves once a drain has begun and its grace is over: what a connection still open then
/// is closed for.
pub async fn deadline() {
    let mut rx = DRAIN.started.subscribe();
    let grace = match rx.wait_for(Option::is_some).await {
        Ok(g) => (*g).unwrap_or_default(),
        // The sender is a static and never goes: this is unreachable, and means "never".
        Err(_) => Duration::MAX,
    };
    tokio::time::sleep(grace).await;
}

/// Begins the drain and waits for every tracked task, at most `grace` and the time to close
/// cleanly. Returns how many tasks were still running when it gave up.
pub async fn run(grace: Duration) -> usize {
    DRAIN.started.send_replace(Some(grace));
    DRAIN.tasks.close();
    let open = DRAIN.tasks.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            grace_ms = grace.as_millis() as u64,
            "draining"
        );
    }
    match tokio::time::timeout(grace + CLOSE_BOUND, DRAIN.tasks.wait()).await {
        Ok(()) => 0,
        Err(_) => DRAIN.tasks.len(),
    }
}

/// After `run`: waits up to `bound` more for the tasks still running (those started since, with
/// their own grace), without cutting any. Returns how many are left.
pub async fn settle(bound: Duration) -> usize {
    match tokio::time::timeout(bound, DRAIN.tasks.wait()).await {
        Ok(()) => 0,
        Err(_) => DRAIN.tasks.len(),
    }
}

/// hyper's executor for HTTP/2 connections and streams: their tasks are tracked, so a stop
/// waits for their GOAWAY and close_notify.
#[derive(Clone, Copy, Debug, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        DRAIN.tasks.spawn(fut);
    }
}
