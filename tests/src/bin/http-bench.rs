//! Benchmark server: `http-bench ADDR...`. Answers every HTTP/1.0 request with a fixed 200 and
//! closes, on one event-loop thread (as an nginx worker would): cheap per connection, so a
//! connections-per-second bench measures the path between client and server, not the server
//! (http-echo spawns a thread per connection, which dominated the figures).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nbench\n";

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; 1024];
    let mut seen = 0;
    // Up to the end of the request head, then the answer and close.
    while !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
        if seen == buf.len() {
            break;
        }
        let n = s.read(&mut buf[seen..]).await?;
        if n == 0 {
            return Ok(());
        }
        seen += n;
    }
    s.write_all(RESPONSE).await?;
    s.shutdown().await
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
