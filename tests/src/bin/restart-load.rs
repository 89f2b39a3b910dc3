//! A VM's traffic held through a restart of its interceptor, and what it lost:
//! `restart-load SECS DNS_SERVER NAME QPS TARGET CONN_RATE STREAMS`, all at once for SECS s:
//! - DNS: A queries for NAME (a mesh name) to DNS_SERVER at QPS, each given the 5 s a glibc
//!   client waits: answered, timed out, the slowest answer;
//! - new connections to TARGET (a mesh service that echoes lines) at CONN_RATE per second,
//!   each sending one line and reading it back: ok; refused (connect() failed); cut (connected,
//!   then reset or closed before the echo: what a proxy that dies with the connection in hand
//!   does); stalled (no echo within 10 s); the first few errors and the slowest success;
//! - STREAMS long-lived connections to TARGET opened first, each sending a line every 200 ms
//!   and reading it back: intact at the end, broken (the lines sent and never echoed).
//!
//! Prints `warm` once the streams are open and everything runs, then one JSON line at the end.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

/// How long a glibc resolver waits for an answer before it retries (resolv.conf's timeout).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect, and the echo of a line, within this or the connection failed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Slowest(Mutex<Duration>);

impl Slowest {
    fn see(&self, d: Duration) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m = (*m).max(d);
    }
    fn ms(&self) -> f64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_secs_f64()
            * 1000.0
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [secs, dns, name, qps, target, rate, streams] = args.as_slice() else {
        anyhow::bail!("usage: restart-load SECS DNS_SERVER NAME QPS TARGET CONN_RATE STREAMS");
    };
    let secs: u64 = secs.parse()?;
    let dns: SocketAddr = dns.parse()?;
    let qps: u64 = qps.parse()?;
    let target: SocketAddr = target.parse()?;
    let rate: u64 = rate.parse()?;
    let streams: usize = streams.parse()?;

    let mut open = Vec::new();
    for i in 0..streams {
        let mut s = Line::connect(target)?;
        s.echo(&format!("stream {i} hello"))?;
        open.push(s);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let stream_threads: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, s)| std::thread::spawn(move || hold(s, i, end)))
        .collect();
    let dns_stats = Arc::new(DnsStats::default());
    let dns_thread = {
        let stats = dns_stats.clone();
        let name = name.clone();
        std::thread::spawn(move || query_loop(dns, &name, qps, end, &stats))
    };
    let conns = Arc::new(ConnStats::default());
    let conn_thread = {
        let conns = conns.clone();
        std::thread::spawn(move || connect_loop(target, rate, end, &conns))
    };
    println!("warm");
    std::io::stdout().flush()?;

    let held: Vec<Held> = stream_threads
        .into_iter()
        .map(|t| t.join().unwrap_or(Held::Broken { lost: 0 }))
        .collect();
    let dns_result = dns_thread
        .join()
        .map_err(|_| anyhow::anyhow!("DNS thread"))?;
    let _ = conn_thread.join();
    let broken: Vec<u64> = held
        .iter()
        .filter_map(|h| match h {
            Held::Broken { lost } => Some(*lost),
            Held::Intact => None,
        })
        .collect();
    let failures = conns.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "{}",
        serde_json::json!({
            "dns": {
                "sent": dns_result.sent,
                "answered": dns_result.answered,
                "timeouts": dns_result.sent - dns_result.answered,
                "slowest_ms": dns_stats.slowest.ms(),
            },
            "connects": {
                "ok": conns.ok.load(Ordering::Relaxed),
                "refused": conns.refused.load(Ordering::Relaxed),
                "cut": conns.cut.load(Ordering::Relaxed),
                "stalled": conns.stalled.load(Ordering::Relaxed),
                "why": failures,
                "slowest_ms": conns.slowest.ms(),
            },
            "streams": {
                "opened": streams,
                "intact": held.len() - broken.len(),
                "broken": broken.len(),
                "lines_lost": broken.iter().sum::<u64>(),
            },
        })
    );
    Ok(())
}

/// A TCP connection that echoes lines.
struct Line {
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl Line {
    fn connect(target: SocketAddr) -> std::io::Result<Line> {
        let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(Line {
            read: BufReader::new(s.try_clone()?),
            write: s,
        })
    }

    fn echo(&mut self, line: &str) -> std::io::Result<()> {
        self.write.write_all(format!("{line}\n").as_bytes())?;
        let mut back = String::new();
        if self.read.read_line(&mut back)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if back.trim_end() != line {
            return Err(std::io::Error::other(format!("echoed {back:?}")));
        }
        Ok(())
    }
}

enum Held {
    Intact,
    /// Lines sent from the break on that never came back (the one in flight).
    Broken {
        lost: u64,
    },
}

fn hold(mut s: Line, i: usize, end: Instant) -> Held {
    let mut k = 0u64;
    while Instant::now() < end {
        k += 1;
        if s.echo(&format!("stream {i} line {k}")).is_err() {
            return Held::Broken { lost: 1 };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Held::Intact
}

#[derive(Default)]
struct DnsStats {
    slowest: Slowest,
}

struct DnsResult {
    sent: u64,
    answered: u64,
}

/// Queries paced at `qps` from one socket, answers matched by id by a receiving thread; a
/// query unanswered after DNS_TIMEOUT is a timeout.
fn query_loop(dns: SocketAddr, name: &str, qps: u64, end: Instant, stats: &DnsStats) -> DnsResult {
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return DnsResult {
            sent: 0,
            answered: 0,
        };
    };
    let pending: Arc<Mutex<HashMap<u16, Instant>>> = Arc::default();
    let answered = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (sock, pending, answered) = (sock.try_clone(), pending.clone(), answered.clone());
        let last = end + DNS_TIMEOUT;
        std::thread::spawn(move || {
            let Ok(sock) = sock else {
                return Duration::ZERO;
            };
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut slowest = Duration::ZERO;
            let mut buf = [0u8; 1500];
            while Instant::now() < last {
                let Ok((len, _)) = sock.recv_from(&mut buf) else {
                    if pending.lock().map(|p| p.is_empty()).unwrap_or(true) && Instant::now() > end
                    {
                        break;
                    }
                    continue;
                };
                let Ok(m) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let sent = pending.lock().ok().and_then(|mut p| p.remove(&m.id()));
                if let Some(at) = sent {
                    let took = at.elapsed();
                    if took <= DNS_TIMEOUT && !m.answers().is_empty() {
                        answered.fetch_add(1, Ordering::Relaxed);
                        slowest = slowest.max(took);
                    }
                }
            }
            slowest
        })
    };
    let Ok(qname) = Name::from_ascii(name) else {
        return DnsResult {
            sent: 0,
            answered: 0,
        };
    };
    let mut query = Message::new();
    query.set_recursion_desired(true);
    query.add_query(Query::query(qname, RecordType::A));
    let interval = Duration::from_secs_f64(1.0 / qps.max(1) as f64);
    let (mut sent, mut id, mut next) = (0u64, 0u16, Instant::now());
    while Instant::now() < end {
        id = id.wrapping_add(1);
        query.set_id(id);
        if let Ok(bytes) = query.to_vec() {
            if let Ok(mut p) = pending.lock() {
                p.insert(id, Instant::now());
            }
            sent += 1;
            let _ = sock.send_to(&bytes, dns);
        }
        next += interval;
        match next.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => next = Instant::now(),
        }
    }
    stats.slowest.see(receiver.join().unwrap_or_default());
    DnsResult {
        sent,
        answered: answered.load(Ordering::Relaxed),
    }
}

#[derive(Default)]
struct ConnStats {
    ok: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    stalled: AtomicU64,
    slowest: Slowest,
    /// The first few failures, as the error said.
    why: Mutex<Vec<String>>,
}

/// A new connection every 1/rate s, each on a thread of its own: connect, one line echoed,
/// close.
fn connect_loop(target: SocketAddr, rate: u64, end: Instant, stats: &Arc<ConnStats>) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = Instant::now();
    let mut threads = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let stats = stats.clone();
        threads.push(std::thread::spawn(move || {
            let started = Instant::now();
            let result = match Line::connect(target) {
                Ok(mut l) => l.echo(&format!("conn {n}")).map_err(|e| {
                    let stalled = matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    );
                    (if stalled { &stats.stalled } else { &stats.cut }, e)
                }),
                Err(e) => Err((&stats.refused, e)),
            };
            match result {
                Ok(()) => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                    stats.slowest.see(started.elapsed());
                }
                Err((counter, e)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let mut why = stats.why.lock().unwrap_or_else(|e| e.into_inner());
                    if why.len() < 5 {
                        why.push(format!("conn {n}: {e}"));
                    }
                }
            }
        }));
        threads.retain(|t| !t.is_finished());
        next += interval;
        match next.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => next = Instant::now(),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}
