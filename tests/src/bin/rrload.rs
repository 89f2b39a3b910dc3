//! Request/response latency at a fixed rate over one connection: `rrload ADDR RATE SECONDS
//! [http]`. Sends a 64-byte message every 1/RATE s, waits for its echo (with `http`: an HTTP/1.1
//! GET on a kept connection, waiting for the whole response), prints p50/p99 (microseconds) as
//! JSON. A late send is not skipped, so queueing shows in the tail (no coordinated omission
//! hiding).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, rate, secs, http) = match args.as_slice() {
        [a, r, s] => (a, r, s, false),
        [a, r, s, h] if h == "http" => (a, r, s, true),
        _ => anyhow::bail!("usage: rrload ADDR RATE SECONDS [http]"),
    };
    let addr: SocketAddr = addr.parse()?;
    let rate: f64 = rate.parse()?;
    let secs: f64 = secs.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = [b'x'; 64];
    let mut buf = [0u8; 64];
    let request = format!("GET /rr HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut reader = std::io::BufReader::new(s.try_clone()?);
    let mut exchange = |s: &mut TcpStream| -> anyhow::Result<()> {
        match http {
            false => {
                s.write_all(&msg)?;
                s.read_exact(&mut buf)?;
            }
            true => {
                s.write_all(request.as_bytes())?;
                read_response(&mut reader)?;
            }
        }
        Ok(())
    };
    // Warm up the path (handshakes, first allocations) before measuring.
    for _ in 0..50 {
        exchange(&mut s)?;
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let n = (rate * secs) as u64;
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let scheduled = start + interval.mul_f64(i as f64);
        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        exchange(&mut s)?;
        // From the scheduled time: a stall delays every later request, and that is counted.
        lat.push(scheduled.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "{}",
        serde_json::json!({"requests": n, "p50_us": p(0.5), "p99_us": p(0.99)})
    );
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(r: &mut impl std::io::BufRead) -> anyhow::Result<()> {
    let mut len = None;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        anyhow::ensure!(r.read_line(&mut line)? > 0, "closed mid-response");
        let l = line.trim_end().to_ascii_lowercase();
        if first {
            anyhow::ensure!(l.starts_with("http/1.1 200"), "answer: {l}");
            first = false;
        } else if l.is_empty() {
            break;
        } else if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let len = len.ok_or_else(|| anyhow::anyhow!("no content-length"))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(())
}
