//! Test server: `http-echo NAME ADDR...`. Answers every HTTP request with
//! "NAME METHOD PATH from PEER" and prints the same line, so a test sees who reached whom.
//! With HTTP_ECHO_STATUS_FILE set, the status code is what that file holds (200 without it):
//! an application whose health a test turns. A path `/status/N` answers N, `/delay/MS` waits
//! MS milliseconds first. The answer's `x-echo-headers` header lists the request's headers
//! (`name=value;...`). A request with `Upgrade: echo` gets a 101 and its bytes echoed after it.
//! With HTTP_ECHO_KEEPALIVE set, HTTP/1.1 connections stay open for the
//! next request (else each answer closes its connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

struct Request {
    line: String,
    headers: Vec<(String, String)>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length: u64 = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        skip_chunks(reader)?;
    } else {
        std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink())?;
    }
    Ok(Some(Request { line, headers }))
}

/// Reads a chunked body (and its trailers) to its end.
fn skip_chunks(reader: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let hex = size.trim().split(';').next().unwrap_or("0");
        let n = u64::from_str_radix(hex, 16).unwrap_or(0);
        if n == 0 {
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        std::io::copy(&mut reader.by_ref().take(n + 2), &mut std::io::sink())?;
    }
}

fn status_of(path: &str) -> u16 {
    if let Some(n) = path.strip_prefix("/status/").and_then(|s| s.parse().ok()) {
        return n;
    }
    std::env::var_os("HTTP_ECHO_STATUS_FILE")
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(200)
}

fn serve(name: &str, mut stream: TcpStream, keepalive: bool) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    while let Some(req) = read_request(&mut reader)? {
        let mut parts = req.line.split_whitespace();
        let (method, path, version) = (
            parts.next().unwrap_or("-"),
            parts.next().unwrap_or("-"),
            parts.next().unwrap_or("HTTP/1.0"),
        );
        if let Some(ms) = path.strip_prefix("/delay/").and_then(|s| s.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let body = format!("{name} {method} {path} from {peer}\n");
        print!("{body}");
        std::io::stdout().flush()?;
        // `Upgrade: echo` (as a websocket's upgrade): 101, then the raw bytes echoed.
        let upgrade = req
            .headers
            .iter()
            .any(|(k, v)| k == "upgrade" && v.eq_ignore_ascii_case("echo"));
        if upgrade {
            write!(
                stream,
                "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
            )?;
            stream.flush()?;
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&buf[..n])?;
            }
        }
        let close_asked = req
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        let keep = keepalive && version == "HTTP/1.1" && !close_asked;
        let echoed: Vec<String> = req
            .headers
            .iter()
            .filter(|(_, v)| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(
            stream,
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nx-echo-headers: {}\r\nConnection: {}\r\n\r\n{body}",
            status_of(path),
            body.len(),
            echoed.join(";"),
            if keep { "keep-alive" } else { "close" },
        )?;
        stream.flush()?;
        if !keep {
            break;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: http-echo NAME ADDR..."))?;
    let keepalive = std::env::var_os("HTTP_ECHO_KEEPALIVE").is_some();
    let mut handles = Vec::new();
    for addr in args {
        let listener = TcpListener::bind(&addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
        let name = name.clone();
        handles.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve(&name, stream, keepalive));
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
