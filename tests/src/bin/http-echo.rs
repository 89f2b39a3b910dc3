//! Test server: `http-echo NAME ADDR...`. Answers every HTTP request with
//! "NAME METHOD PATH from PEER" and prints the same line, so a test sees who reached whom.
//! With HTTP_ECHO_STATUS_FILE set, the status code is what that file holds (200 without it):
//! an application whose health a test turns.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn serve(name: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("-"), parts.next().unwrap_or("-"));
    let body = format!("{name} {method} {path} from {peer}\n");
    print!("{body}");
    std::io::stdout().flush()?;
    let status: u16 = std::env::var_os("HTTP_ECHO_STATUS_FILE")
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(200);
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: http-echo NAME ADDR..."))?;
    let mut handles = Vec::new();
    for addr in args {
        let listener = TcpListener::bind(&addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
        let name = name.clone();
        handles.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve(&name, stream));
            }
        }));
    }
    println!("{name} listening");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
