//! The soak's load and its echo server.
//! - `soak-load serve ADDR`: echoes every byte of every connection.
//! - `soak-load run SECS TARGET HELD NEW_PER_S DNS_SERVER NAME DNS_PER_S`: opens HELD
//!   connections to TARGET (64 at a time), each checked by an echo, and holds them; prints
//!   `{"held_open": N, "open_s": S}`. Then for SECS seconds: every held connection checks an
//!   echo of random bytes every 5 s; NEW_PER_S new connections a second each echo 4 KiB and
//!   close (their connect-to-echo time is measured); DNS_PER_S A queries for NAME. One JSON line
//!   a second, and a last one with the totals. A mismatched echo counts as broken.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Default)]
struct Counts {
    held: AtomicU64,
    broken: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    dns_ok: AtomicU64,
    dns_failed: AtomicU64,
    /// Connect-to-echo times of new connections this second, µs.
    latencies: Mutex<Vec<u64>>,
}

fn main() -> anyhow::Result<()> {
    interceptor_tests::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", addr] => rt.block_on(serve(addr.parse()?)),
        ["run", secs, target, held, new, dns, name, qps] => rt.block_on(run(
            secs.parse()?,
            target.parse()?,
            held.parse()?,
            new.parse()?,
            dns.parse()?,
            name,
            qps.parse()?,
        )),
        _ => anyhow::bail!(
            "usage: soak-load serve ADDR | run SECS TARGET HELD NEW_PER_S DNS_SERVER NAME DNS_PER_S"
        ),
    }
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    println!("listening");
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Sends `len` pseudo-random bytes and checks they come back whole.
async fn echo(s: &mut TcpStream, len: usize, seed: u64) -> std::io::Result<bool> {
    let sent: Vec<u8> = (0..len as u64)
        .map(|i| {
            (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i.wrapping_mul(1442695040888963407))
                >> 56) as u8
        })
        .collect();
    s.write_all(&sent).await?;
    let mut got = vec![0u8; len];
    s.read_exact(&mut got).await?;
    Ok(got == sent)
}

async fn run(
    secs: u64,
    target: SocketAddr,
    held: usize,
    new_per_s: u64,
    dns: SocketAddr,
    name: &str,
    qps: u64,
) -> anyhow::Result<()> {
    let c = Arc::new(Counts::default());
    let start = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..held {
        let gate = gate.clone();
        opening.spawn(async move {
            let _p = gate.acquire_owned().await.ok()?;
            let mut s = TcpStream::connect(target).await.ok()?;
            echo(&mut s, 64, i as u64).await.ok()?.then_some(s)
        });
    }
    let mut conns = Vec::with_capacity(held);
    while let Some(r) = opening.join_next().await {
        if let Ok(Some(s)) = r {
            conns.push(s);
        }
    }
    println!(
        "{}",
        serde_json::json!({"held_open": conns.len(), "open_s": start.elapsed().as_secs_f64()})
    );
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        let c = c.clone();
        c.held.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            // Spread the checks over the 5 s period.
            tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 5000)).await;
            let mut round = 0u64;
            while Instant::now() < end {
                round += 1;
                if !matches!(echo(&mut s, 256, round << 32 | i as u64).await, Ok(true)) {
                    c.broken.fetch_add(1, Ordering::Relaxed);
                    c.held.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
    {
        let c = c.clone();
        tasks.spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / new_per_s.max(1) as f64));
            let mut n = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                n += 1;
                let c = c.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let ok = async {
                        let mut s = TcpStream::connect(target).await?;
                        echo(&mut s, 4096, n).await
                    };
                    match tokio::time::timeout(Duration::from_secs(10), ok).await {
                        Ok(Ok(true)) => {
                            c.new_ok.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut l) = c.latencies.lock() {
                                l.push(t.elapsed().as_micros() as u64);
                            }
                        }
                        _ => {
                            c.new_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
    }
    {
        let c = c.clone();
        let name = Name::from_ascii(name)?;
        tasks.spawn(async move {
            let Ok(sock) = UdpSocket::bind("0.0.0.0:0").await else {
                return;
            };
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / qps.max(1) as f64));
            let mut id = 0u16;
            let mut buf = [0u8; 1500];
            while Instant::now() < end {
                tick.tick().await;
                id = id.wrapping_add(1);
                let mut m = Message::new();
                m.set_id(id).set_recursion_desired(true);
                m.add_query(Query::query(name.clone(), RecordType::A));
                let Ok(bytes) = m.to_vec() else { return };
                let answered = async {
                    sock.send_to(&bytes, dns).await?;
                    loop {
                        let (n, _) = sock.recv_from(&mut buf).await?;
                        if let Ok(r) = Message::from_vec(&buf[..n]) {
                            if r.id() == id {
                                return Ok::<bool, std::io::Error>(!r.answers().is_empty());
                            }
                        }
                    }
                };
                match tokio::time::timeout(Duration::from_secs(1), answered).await {
                    Ok(Ok(true)) => c.dns_ok.fetch_add(1, Ordering::Relaxed),
                    _ => c.dns_failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    let began = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut l = c
            .latencies
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        l.sort_unstable();
        let p = |q: f64| {
            l.get(((l.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        println!(
            "{}",
            serde_json::json!({
                "t": began.elapsed().as_secs(),
                "held": c.held.load(Ordering::Relaxed),
                "broken": c.broken.load(Ordering::Relaxed),
                "new_ok": c.new_ok.load(Ordering::Relaxed),
                "new_failed": c.new_failed.load(Ordering::Relaxed),
                "new_p50_ms": p(0.5),
                "new_p99_ms": p(0.99),
                "dns_ok": c.dns_ok.load(Ordering::Relaxed),
                "dns_failed": c.dns_failed.load(Ordering::Relaxed),
            })
        );
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "{}",
        serde_json::json!({
            "done": true,
            "held": c.held.load(Ordering::Relaxed),
            "broken": c.broken.load(Ordering::Relaxed),
            "new_ok": c.new_ok.load(Ordering::Relaxed),
            "new_failed": c.new_failed.load(Ordering::Relaxed),
            "dns_ok": c.dns_ok.load(Ordering::Relaxed),
            "dns_failed": c.dns_failed.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
