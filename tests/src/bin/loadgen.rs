//! Connection benchmark client: `loadgen ADDR SECONDS CONCURRENCY`. Each round opens a TCP
//! connection, sends a one-line HTTP request, reads the whole answer and closes. Prints JSON:
//! connections per second and connect+first-byte latency percentiles.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn one(addr: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /bench HTTP/1.0\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the first byte",
        ));
    }
    let first_byte = start.elapsed();
    while s.read(&mut buf)? > 0 {}
    Ok(first_byte)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, secs, conc] = args.as_slice() else {
        anyhow::bail!("usage: loadgen ADDR SECONDS CONCURRENCY")
    };
    let addr: SocketAddr = addr.parse()?;
    let secs: f64 = secs.parse()?;
    let conc: usize = conc.parse()?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    match one(addr) {
                        Ok(d) => lat.push(d.as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({"connections": all.len(), "errors": errors, "cps": all.len() as f64 / elapsed, "p50_us": pct(0.50), "p99_us": pct(0.99)})
    );
    Ok(())
}
