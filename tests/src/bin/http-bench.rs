//! Benchmark server: `http-bench ADDR...`. Answers an HTTP/1.0 request with a fixed 200 and
//! closes, on one event-loop thread (as an nginx worker would): cheap per connection, so a
//! connections-per-second bench measures the path between client and server, not the server
//! (http-echo spawns a thread per connection, which dominated the figures). An HTTP/1.1
//! request gets a 1 KiB body and the connection stays open for the next one (unless it asks
//! `Connection: close`), as the HTTP bench needs.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nbench\n";
const BODY: usize = 1024;

fn keepalive_response(close: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\nContent-Type: text/plain\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    r.resize(r.len() + BODY, b'x');
    r
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (keep, close) = (keepalive_response(false), keepalive_response(true));
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    loop {
        // Up to the end of a request head (bodies are not expected: GETs).
        let end = loop {
            if let Some(i) = buf[..seen].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if seen == buf.len() {
                return Ok(());
            }
            let n = s.read(&mut buf[seen..]).await?;
            if n == 0 {
                return Ok(());
            }
            seen += n;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.copy_within(end..seen, 0);
        seen -= end;
        if !head.lines().next().is_some_and(|l| l.ends_with("http/1.1")) {
            s.write_all(RESPONSE).await?;
            return s.shutdown().await;
        }
        if head.contains("\r\nconnection: close") {
            s.write_all(&close).await?;
            return s.shutdown().await;
        }
        s.write_all(&keep).await?;
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for addr in std::env::args().skip(1) {
            let l = TcpListener::bind(&addr)
                .await
                .map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
            listeners.push(l);
        }
        println!("http-bench listening");
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            tasks.spawn(async move {
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        tokio::spawn(serve(s));
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}
