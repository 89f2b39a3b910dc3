//! What crossed a link: tcpdump in a test namespace, and the TCP payloads of its capture.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{sh, Netns, Proc};

/// A running `tcpdump -w` on one interface of a namespace. `stop` flushes and ends it.
pub struct Tcpdump {
    proc: Proc,
    pub pcap: PathBuf,
}

impl Tcpdump {
    pub fn start(ns: &Netns, iface: &str, filter: &str, pcap: PathBuf) -> Self {
        let mut c = ns.cmd("tcpdump");
        c.args([
            "-i",
            iface,
            "--immediate-mode",
            "-Z",
            "root",
            "-U",
            "-nn",
            "-w",
        ])
        .arg(&pcap)
        .arg(filter);
        let log = pcap.with_extension("log");
        let mut proc = Proc::spawn("tcpdump", c, log);
        proc.wait_for_output("listening on", 10.0);
        Self { proc, pcap }
    }

    /// Ends the capture once the file stops growing (tcpdump -U writes each packet as it
    /// comes, so a file that holds still has everything that crossed).
    pub fn stop(mut self) -> PathBuf {
        let size = || std::fs::metadata(&self.pcap).map(|m| m.len()).unwrap_or(0);
        let mut last = size();
        let _ = crate::wait_for(3.0, || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = size();
            let still = now == last && now > 0;
            last = now;
            still.then_some(())
        });
        self.proc.signal(libc::SIGINT);
        self.proc.wait_exit(5.0);
        self.pcap.clone()
    }
}

/// TCP payloads of the packets in `pcap` that match `filter`, in capture order.
pub fn tcp_payloads(pcap: &Path, filter: &str) -> Vec<Vec<u8>> {
    let text = sh(Command::new("tcpdump")
        .args(["-nn", "-x", "-r"])
        .arg(pcap)
        .arg(filter));
    let mut packets: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        if let Some(hex) = line
            .trim_start()
            .strip_prefix("0x")
            .and_then(|l| l.split_once(':'))
            .map(|(_, h)| h)
        {
            let bytes = hex.split_whitespace().flat_map(|w| {
                (0..w.len())
                    .step_by(2)
                    .filter_map(move |i| u8::from_str_radix(w.get(i..i + 2)?, 16).ok())
            });
            if let Some(p) = packets.last_mut() {
                p.extend(bytes);
            }
        } else if !line.starts_with('\t') && !line.trim().is_empty() {
            packets.push(Vec::new());
        }
    }
    packets
        .into_iter()
        .filter_map(|p| {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let doff = usize::from(p.get(ihl + 12)? >> 4) * 4;
            let payload = p.get(ihl + doff..)?.to_vec();
            (!payload.is_empty()).then_some(payload)
        })
        .collect()
}
