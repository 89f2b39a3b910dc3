//! Load held across a fault, and what it saw: `chaos-load SECS DNS_SERVER NAME QPS CONNECT_ADDR
//! HOLD_ADDR N`, all at once for SECS seconds:
//! - DNS: A queries for NAME to DNS_SERVER at QPS in total (4 senders, each waiting up to
//!   100 ms per answer): answered, failed, and the longest gap between two answers;
//! - new TCP connections to CONNECT_ADDR (a non-mesh address) one after another: made, failed;
//! - N connections to HOLD_ADDR (a stream-check echo server, through capture) opened first,
//!   each echoing once, then held: closed by EOF, closed by a reset, or still open at the end
//!   (hung).
//!
//! Prints `warm` once everything runs, then one JSON line at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [secs, dns, name, qps, connect, hold, n] = args.as_slice() else {
        anyhow::bail!("usage: chaos-load SECS DNS_SERVER NAME QPS CONNECT_ADDR HOLD_ADDR N");
    };
    let secs: u64 = secs.parse()?;
    let dns: SocketAddr = dns.parse()?;
    let qps: u64 = qps.parse()?;
    let connect: SocketAddr = connect.parse()?;
    let hold: SocketAddr = hold.parse()?;
    let n: usize = n.parse()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);

    // Held connections first: each echoes once before the clock matters.
    let mut held = Vec::new();
    let mut echoed = 0;
    for _ in 0..n {
        let mut s = TcpStream::connect(hold)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut b = [0u8; 1];
        s.write_all(b"ex")?;
        s.read_exact(&mut b)?;
        echoed += 1;
        held.push(s);
    }
    let (eof, reset, hung) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut threads = Vec::new();
    for mut s in held {
        let (eof, reset, hung) = (eof.clone(), reset.clone(), hung.clone());
        threads.push(std::thread::spawn(move || {
            let left = end.saturating_duration_since(Instant::now());
            let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => eof.fetch_add(1, Ordering::Relaxed),
                Ok(_) => hung.fetch_add(1, Ordering::Relaxed),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    hung.fetch_add(1, Ordering::Relaxed)
                }
                Err(_) => reset.fetch_add(1, Ordering::Relaxed),
            };
        }));
    }

    let answers = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    const SENDERS: u64 = 4;
    let query = {
        let mut m = Message::new();
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
        m
    };
    for i in 0..SENDERS {
        let (answers, sent, failed, mut query) =
            (answers.clone(), sent.clone(), failed.clone(), query.clone());
        let interval = Duration::from_secs_f64(SENDERS as f64 / qps.max(1) as f64);
        threads.push(std::thread::spawn(move || {
            let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
                return;
            };
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut id = (i as u16) << 12;
            let mut next = Instant::now();
            let mut buf = [0u8; 1500];
            while Instant::now() < end {
                id = id.wrapping_add(1);
                query.set_id(id);
                let Ok(bytes) = query.to_vec() else { return };
                sent.fetch_add(1, Ordering::Relaxed);
                let ok = sock.send_to(&bytes, dns).is_ok()
                    && loop {
                        match sock.recv_from(&mut buf) {
                            // A late answer to an earlier query: keep waiting for ours.
                            Ok((len, _)) => match Message::from_vec(&buf[..len]) {
                                Ok(m) if m.id() == id => break !m.answers().is_empty(),
                                _ => continue,
                            },
                            Err(_) => break false,
                        }
                    };
                if ok {
                    answers.lock().unwrap().push(start.elapsed());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
        }));
    }

    let (made, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    {
        let (made, refused) = (made.clone(), refused.clone());
        threads.push(std::thread::spawn(move || {
            while Instant::now() < end {
                match TcpStream::connect_timeout(&connect, Duration::from_secs(2)) {
                    Ok(_) => made.fetch_add(1, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("warm");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    let mut at = answers.lock().unwrap().clone();
    at.sort();
    let longest_gap = at
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::from_secs(secs));
    println!(
        "{}",
        serde_json::json!({
            "dns": {
                "sent": sent.load(Ordering::Relaxed),
                "ok": at.len(),
                "failed": failed.load(Ordering::Relaxed),
                "longest_gap_ms": longest_gap.as_secs_f64() * 1000.0,
            },
            "connects": {"ok": made.load(Ordering::Relaxed), "failed": refused.load(Ordering::Relaxed)},
            "held": {
                "echoed": echoed,
                "closed_eof": eof.load(Ordering::Relaxed),
                "closed_reset": reset.load(Ordering::Relaxed),
                "hung": hung.load(Ordering::Relaxed),
            },
        })
    );
    Ok(())
}
