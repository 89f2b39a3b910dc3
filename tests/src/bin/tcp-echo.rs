//! Test server: `tcp-echo ADDR...` echoes every byte back, one thread per connection. With
//! TCP_ECHO_GREETING set, it first sends that line unasked (a server-first protocol, as SMTP
//! or MySQL).

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() -> anyhow::Result<()> {
    let greeting = std::env::var("TCP_ECHO_GREETING")
        .ok()
        .map(|g| format!("{g}\r\n"));
    let mut handles = Vec::new();
    for addr in std::env::args().skip(1) {
        let greeting = greeting.clone();
        let listener = TcpListener::bind(&addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
        handles.push(std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let greeting = greeting.clone();
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    if let Some(g) = &greeting {
                        if s.write_all(g.as_bytes()).is_err() {
                            return;
                        }
                    }
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
    println!("tcp-echo listening");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
