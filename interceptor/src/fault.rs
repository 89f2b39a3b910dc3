//! Fault injection for the supervisor's own scenario test, compiled only with the `test-hooks`
//! feature (`cargo xtask test` builds the daemon with it; releases never have it).
//!
//! `INTERCEPTOR_TEST_PANIC_ACCEPT=<loop>` makes that accept loop (`outbound`, `inbound`, `dns`,
//! `admin`, `gateway`) panic on its first connection, the way a bug would.

#[cfg(feature = "test-hooks")]
pub fn on_accept(what: &str) {
    if std::env::var("INTERCEPTOR_TEST_PANIC_ACCEPT").is_ok_and(|v| v == what) {
        panic!("test hook: {what} accept loop panics");
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn on_accept(_what: &str) {}

/// `INTERCEPTOR_TEST_EXIT_DELAY_MS`: after a part died and the others stopped, keep the admin
/// endpoint up this long before exiting, so a test can watch readiness say so.
#[cfg(feature = "test-hooks")]
pub async fn before_exit() {
    if let Some(ms) = std::env::var("INTERCEPTOR_TEST_EXIT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "test-hooks"))]
pub async fn before_exit() {}
