//! Test peer that records how its clients close: `hbone-record CERT_DIR HBONE_ADDR TLS_ADDR`.
//! On HBONE_ADDR, TLS 1.3 with ALPN h2 and HTTP/2 CONNECT streams answered 200 and echoed; on
//! TLS_ADDR, TLS (any ALPN, as a sidecar's inbound) echoed. When a client's connection ends it
//! prints one line:
//!
//! `closed kind=hbone goaway=NO_ERROR tls_end=close_notify streams=1 rst_streams=0`
//!
//! `goaway` is the error code of the client's GOAWAY frame (`none` if it sent none), read from
//! the bytes the client sent; `tls_end` is `close_notify`, `no_close_notify` (a FIN with no
//! alert first) or the error. The client's side is read to its end whatever the server did.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(dir: &str, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(format!("{dir}/cert-chain.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/key.pem"))?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, hbone, tls] = args.as_slice() else {
        anyhow::bail!("usage: hbone-record CERT_DIR HBONE_ADDR TLS_ADDR");
    };
    let h2 = TcpListener::bind(hbone).await?;
    let plain = TcpListener::bind(tls).await?;
    let h2_config = config(dir, &[b"h2"])?;
    let tls_config = config(dir, &[b"istio", b"istio-peer-exchange"])?;
    println!("hbone-record listening");
    loop {
        let (stream, peer, hbone) = tokio::select! {
            r = h2.accept() => { let (s, p) = r?; (s, p, true) }
            r = plain.accept() => { let (s, p) = r?; (s, p, false) }
        };
        let config = if hbone { &h2_config } else { &tls_config }.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, peer, config, hbone).await {
                println!("failed {peer}: {e}");
            }
        });
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    hbone: bool,
) -> anyhow::Result<()> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await?;
    let (mut tls_read, mut tls_write) = tokio::io::split(tls);
    // The server (hyper, or the echo) talks to one end of a pipe; we pump the other end to and
    // from TLS, so the client's bytes are seen whole and its side is read to its very end.
    let (server_end, pump_end) = tokio::io::duplex(1 << 20);
    let (mut pump_read, mut pump_write) = tokio::io::split(pump_end);
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = {
        let streams = streams.clone();
        tokio::spawn(async move {
            if hbone {
                let service = hyper::service::service_fn(move |req| {
                    streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(tunnel(req)) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(server_end), service)
                    .await;
            } else {
                let (mut r, mut w) = tokio::io::split(server_end);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        })
    };
    let down = async {
        let _ = tokio::io::copy(&mut pump_read, &mut tls_write).await;
        let _ = tls_write.shutdown().await;
    };
    let up = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let end = loop {
            match tls_read.read(&mut buf).await {
                Ok(0) => break "close_notify".to_string(),
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    // The server may be gone; the client's bytes are still read to the end.
                    let _ = pump_write.write_all(&buf[..n]).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break "no_close_notify".to_string()
                }
                Err(e) => break format!("{:?}", e.kind()),
            }
        };
        let _ = pump_write.shutdown().await;
        (seen, end)
    };
    let ((seen, end), ()) = tokio::join!(up, down);
    server.abort();
    let (goaway, resets) = if hbone {
        frames(&seen)
    } else {
        ("-".into(), 0)
    };
    println!(
        "closed kind={} peer={peer} goaway={goaway} tls_end={end} streams={} rst_streams={resets}",
        if hbone { "hbone" } else { "tls" },
        streams.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(())
}

/// Each CONNECT: 200, then its bytes echoed until the client ends the stream.
fn tunnel(req: Request<hyper::body::Incoming>) -> Response<Empty<Bytes>> {
    let connect = req.method() == Method::CONNECT;
    if connect {
        tokio::spawn(async move {
            if let Ok(up) = hyper::upgrade::on(req).await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        });
    }
    let mut r = Response::new(Empty::new());
    *r.status_mut() = if connect {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    r
}

/// The client's GOAWAY error code (or `none`) and its RST_STREAM count, from the bytes it sent:
/// the connection preface, then frames (RFC 9113 4.1).
fn frames(bytes: &[u8]) -> (String, usize) {
    const PREFACE: usize = 24;
    let mut at = PREFACE;
    let (mut goaway, mut resets) = ("none".to_string(), 0);
    while bytes.len() >= at + 9 {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let kind = bytes[at + 3];
        let payload = &bytes[at + 9..bytes.len().min(at + 9 + len)];
        match kind {
            0x3 => resets += 1,
            0x7 if payload.len() >= 8 => {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                goaway = match code {
                    0 => "NO_ERROR".into(),
                    c => format!("0x{c:x}"),
                };
            }
            _ => {}
        }
        at += 9 + len;
    }
    (goaway, resets)
}
