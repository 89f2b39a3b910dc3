//! Restarts under load, in a guest under its real systemd: what a VM's apps lose when the
//! interceptor restarts (`systemctl restart`, a `kill -9` systemd brings back), and how fast
//! capture is gone when the unit stops for good (stop, a crash loop past the start limit).
//!
//! The load is `restart-load` in the guest (tests/src/bin): DNS queries for a mesh name, new
//! mesh connections each echoing a line, long-lived streams echoing a line every 200 ms, all
//! through capture and mTLS to a pod on the host that echoes (socat's OpenSSL listener).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::scenario::{Run, LOAD_PORT, LOAD_SERVICE};

/// The load held through each event.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub secs: u64,
    /// DNS queries per second.
    pub qps: u64,
    /// New connections per second.
    pub rate: u64,
    pub streams: usize,
}

/// The issue asks 200 connections/s, 500 queries/s and 50 streams; a TCG guest on this 2-core
/// machine spends ~10 ms of emulated CPU per mTLS handshake, so the rates are scaled to what it
/// sustains with no restart at all (the figures are in the README with the scale stated).
pub const LOAD: Load = Load {
    secs: 16,
    qps: 100,
    rate: 10,
    streams: 10,
};

/// What kind of event the load is held through.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    /// The process ends when told: nothing may be lost.
    Restart,
    /// The process is killed: the connections it held are cut (counted), nothing else lost.
    Crash,
}

/// What the load saw through one event.
#[derive(Debug)]
pub struct Outcome {
    pub event: &'static str,
    pub connects: u64,
    /// connect() failed, or no echo within 10 s.
    pub failed_connects: u64,
    /// Connected, then reset or closed before the echo: in the hands of a process that died.
    pub cut: u64,
    pub queries: u64,
    pub dns_timeouts: u64,
    pub streams: u64,
    pub streams_broken: u64,
    pub slowest_connect_ms: f64,
    pub slowest_dns_ms: f64,
    /// The daemon's generation after the event (`interceptor status`).
    pub generation: u64,
}

impl Outcome {
    pub fn header() -> &'static str {
        "| event | new connections | failed (refused or stalled) | cut in flight | DNS queries (timed out) | streams broken | slowest connection | slowest DNS answer | generation after |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    }

    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} ({}) | {} of {} | {:.0} ms | {:.0} ms | {} |",
            self.event,
            self.connects,
            self.failed_connects,
            self.cut,
            self.queries,
            self.dns_timeouts,
            self.streams_broken,
            self.streams,
            self.slowest_connect_ms,
            self.slowest_dns_ms,
            self.generation
        )
    }
}

impl Run {
    /// The load tool, built for this guest's glibc.
    pub(super) fn put_load_tool(&self, bin: &Path) -> anyhow::Result<()> {
        self.guest.put(bin, "/root/restart-load")?;
        self.sh("chmod +x /root/restart-load").map(drop)
    }

    /// Runs the load, `act` once it is flowing, and reads what the load saw.
    pub(super) fn under_load(
        &self,
        load: Load,
        event: &'static str,
        kind: Event,
        act: impl FnOnce(&Run) -> anyhow::Result<()>,
    ) -> anyhow::Result<Outcome> {
        let vip = self.sh(&format!(
            "getent ahostsv4 {LOAD_SERVICE} | head -1 | cut -d' ' -f1"
        ))?;
        // Any nameserver: capture sends every query on port 53 to the daemon.
        let ns = self.sh("awk '/^nameserver/ {print $2; exit}' /etc/resolv.conf")?;
        let Load {
            secs,
            qps,
            rate,
            streams,
        } = load;
        self.sh(&format!(
            "rm -f /root/load.out; nohup /root/restart-load {secs} {ns}:53 {LOAD_SERVICE} {qps} \
             {vip}:{LOAD_PORT} {rate} {streams} >/root/load.out 2>/root/load.err </dev/null &",
            ns = ns.trim(),
            vip = vip.trim(),
        ))?;
        self.until(
            "the load is flowing",
            60,
            "grep -q warm /root/load.out || { cat /root/load.err >&2; false; }",
        )?;
        // Some traffic before the event, so that it lands in the middle of the load.
        std::thread::sleep(Duration::from_secs(3));
        act(self)?;
        self.until(
            "the load's report",
            secs + 60,
            "grep -q '^{' /root/load.out",
        )?;
        let report = self.sh("grep '^{' /root/load.out")?;
        let v: serde_json::Value =
            serde_json::from_str(report.trim()).with_context(|| format!("load said {report}"))?;
        let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(u64::MAX);
        let f = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        let outcome = Outcome {
            event,
            connects: n("/connects/ok")
                + n("/connects/refused")
                + n("/connects/cut")
                + n("/connects/stalled"),
            failed_connects: n("/connects/refused") + n("/connects/stalled"),
            cut: n("/connects/cut"),
            queries: n("/dns/sent"),
            dns_timeouts: n("/dns/timeouts"),
            streams: n("/streams/opened"),
            streams_broken: n("/streams/broken"),
            slowest_connect_ms: f("/connects/slowest_ms"),
            slowest_dns_ms: f("/dns/slowest_ms"),
            generation: self.generation()?,
        };
        eprintln!("vm:   {}", outcome.row());
        // A process killed with connections in hand cuts them: honest, and counted. Nothing
        // else may be lost: not a connect, not a query, and not a connection in a restart.
        let cut_allowed = matches!(kind, Event::Crash);
        if outcome.failed_connects != 0
            || outcome.dns_timeouts != 0
            || (outcome.cut != 0 && !cut_allowed)
        {
            let journal = self.sh("journalctl -u interceptor --no-pager -o short-precise")?;
            let saved = super::image::vm_dir().join(format!("journal-{}.log", self.guest.name));
            std::fs::write(&saved, journal)?;
            eprintln!("vm:   the daemon's whole journal: {}", saved.display());
            bail!(
                "{event}: {} new connections failed, {} cut ({}), {} DNS queries timed out; \
                 the daemon's journal:\n{}",
                outcome.failed_connects,
                outcome.cut,
                v.pointer("/connects/why")
                    .map(|w| w.to_string())
                    .unwrap_or_default(),
                outcome.dns_timeouts,
                self.journal_tail()
            );
        }
        Ok(outcome)
    }

    fn generation(&self) -> anyhow::Result<u64> {
        let status = self.sh("interceptor status --json")?;
        serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v.pointer("/restart/generation").and_then(|g| g.as_u64()))
            .with_context(|| format!("status has no restart.generation: {status}"))
    }

    /// The load with nothing happening: what it loses on its own (must be nothing, or the
    /// figures of the events mean nothing).
    pub(super) fn baseline_load(&self, load: Load) -> anyhow::Result<Outcome> {
        self.under_load(load, "no restart (baseline)", Event::Restart, |_| Ok(()))
    }

    /// `systemctl restart` under load: returns once the new process is READY.
    pub(super) fn restart_under_load(&self, load: Load) -> anyhow::Result<Outcome> {
        self.under_load(load, "systemctl restart", Event::Restart, |run| {
            run.sh("systemctl restart interceptor").map(drop)
        })
    }

    /// `kill -9` of the main PID under load; systemd restarts it (Restart=on-failure).
    pub(super) fn kill9_under_load(&self, load: Load) -> anyhow::Result<Outcome> {
        self.under_load(load, "kill -9 (systemd restarts)", Event::Crash, |run| {
            let pid = run.main_pid()?;
            run.sh(&format!("kill -9 {pid}"))?;
            run.until(
                "restarted by systemd",
                30,
                &format!(
                    "systemctl is-active -q interceptor && \
                     test \"$(systemctl show -p MainPID --value interceptor)\" != {pid}"
                ),
            )
            .map(drop)
        })
    }

    /// How long after `since` the programs were gone from the root cgroup (polled for 3 s).
    fn detached_within(&self, since: Instant) -> anyhow::Result<Duration> {
        let check = "! bpftool cgroup show /sys/fs/cgroup | grep -q connect4";
        while since.elapsed() < Duration::from_secs(3) {
            if self.guest.run(check)?.status.success() {
                return Ok(since.elapsed());
            }
        }
        bail!("capture still attached 3 s after the unit went")
    }

    /// `systemctl stop`: the store is closed with the unit, capture gone within 1 s of it.
    pub(super) fn stop_fails_open(&self) -> anyhow::Result<Duration> {
        self.sh("systemctl stop interceptor")?;
        let stopped = Instant::now();
        let result = self.sh("systemctl show -p Result --value interceptor")?;
        if result.trim() != "success" {
            bail!("stop ended with Result={}", result.trim());
        }
        let took = self.detached_within(stopped)?;
        if took > Duration::from_secs(1) {
            bail!("capture went {took:?} after the stop, not within 1 s");
        }
        Ok(took)
    }

    /// A daemon that can no longer start (a broken config) killed: systemd restarts it until
    /// the start limit, the unit fails, the store is closed, capture gone within 1 s of the
    /// failure. The config and the unit are put back afterwards.
    pub(super) fn crash_loop_fails_open(&self) -> anyhow::Result<Duration> {
        self.sh("systemctl start interceptor")?;
        let pid = self.main_pid()?;
        self.sh(&format!(
            "cp /etc/interceptor/config.yaml /root/config.good && \
             echo 'no-such-setting: 1' >> /etc/interceptor/config.yaml && kill -9 {pid}"
        ))?;
        let started = Instant::now();
        loop {
            let state = self.sh("systemctl is-failed interceptor; true")?;
            if state.trim() == "failed" {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the crash loop never reached the start limit: {state}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let failed = Instant::now();
        let took = self.detached_within(failed)?;
        self.sh("cp /root/config.good /etc/interceptor/config.yaml && \
             systemctl reset-failed interceptor && systemctl start interceptor")?;
        self.capture_attached()?;
        if took > Duration::from_secs(1) {
            bail!("capture went {took:?} after the unit failed, not within 1 s");
        }
        Ok(took)
    }
}
