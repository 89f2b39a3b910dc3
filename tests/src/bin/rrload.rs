//! Request/response latency at a fixed rate over one connection: `rrload ADDR RATE SECONDS`.
//! Sends a 64-byte message every 1/RATE s, waits for its echo, prints p50/p99 (microseconds)
//! as JSON. A late send is not skipped, so queueing shows in the tail (no coordinated omission
//! hiding).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, rate, secs] = args.as_slice() else {
        anyhow::bail!("usage: rrload ADDR RATE SECONDS")
    };
    let addr: SocketAddr = addr.parse()?;
    let rate: f64 = rate.parse()?;
    let secs: f64 = secs.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = [b'x'; 64];
    let mut buf = [0u8; 64];
    // Warm up the path (handshakes, first allocations) before measuring.
    for _ in 0..50 {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
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
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
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
