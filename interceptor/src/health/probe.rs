//! One probe of the application, of each kind a WorkloadGroup can name (SPEC section 10): an
//! HTTP GET that answers 2xx or 3xx, a TCP connect, a command that exits 0, a gRPC health check
//! that says SERVING. Run from this process (its sockets are never captured); an exec command
//! runs in a cgroup the capture programs leave alone.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use tokio::net::TcpStream;

/// Where a probe goes when it names no host: the application on this VM.
pub const DEFAULT_HOST: &str = "127.0.0.1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub https: bool,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Http(Http),
    Tcp { host: String, port: u16 },
    Exec { command: Vec<String> },
    Grpc { port: u16, service: String },
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Http(_) => "httpGet",
            Kind::Tcp { .. } => "tcpSocket",
            Kind::Exec { .. } => "exec",
            Kind::Grpc { .. } => "grpc",
        }
    }
}

/// Runs the probe once, within `timeout`. Err says why it failed (the health report's message).
pub async fn check(
    kind: &Kind,
    timeout: Duration,
    exec_cgroup: Option<&Path>,
) -> Result<(), String> {
    let run = async {
        match kind {
            Kind::Http(h) => http(h).await,
            Kind::Tcp { host, port } => connect(host, *port).await.map(drop),
            Kind::Exec { command } => exec(command, exec_cgroup).await,
            Kind::Grpc { port, service } => grpc(*port, service, timeout).await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{} probe timed out after {timeout:?}",
            kind.label()
        )),
    }
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))
}

/// Kubernetes' rule: 200 to 399 is healthy. HTTPS is not verified (as kubelet's probes).
async fn http(h: &Http) -> Result<(), String> {
    let tcp = connect(&h.host, h.port).await?;
    let authority = format!("{}:{}", h.host, h.port);
    let mut req = hyper::Request::get(&h.path)
        .header(hyper::header::HOST, &authority)
        .header(hyper::header::USER_AGENT, "interceptor-probe/1.0");
    for (k, v) in &h.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let status = if h.https {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify))
            .with_no_client_auth();
        let name = ServerName::try_from(h.host.clone())
            .map_err(|_| format!("{:?} is not a TLS server name", h.host))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {} answered {status}", h.path))
    }
}

async fn send<T>(io: T, req: hyper::Request<Empty<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    conn.abort();
    Ok(resp?.status().as_u16())
}

/// The command's own exit decides; its output (the start of it) explains a failure.
async fn exec(command: &[String], cgroup: Option<&Path>) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("exec: no command")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cgroup {
        let procs = cgroup_procs(dir)?;
        // SAFETY: between fork and exec the child only opens, writes and closes a file with a
        // path prepared before the fork (async-signal-safe calls, no allocation).
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("exec {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    text.truncate(200);
    Err(format!("exec {program}: {}: {text}", out.status))
}

/// `dir/cgroup.procs` as a C string, made before the fork.
fn cgroup_procs(dir: &Path) -> Result<std::ffi::CString, String> {
    let path: PathBuf = dir.join("cgroup.procs");
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: not a C path", path.display()))
}

/// In the child: moves itself (pid "0" means the writer) into the cgroup.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: open/write/close on a valid NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// grpc.health.v1.Health/Check on the application's port.
async fn grpc(port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{DEFAULT_HOST}:{port}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            format!(
                "gRPC connect {DEFAULT_HOST}:{port}: {}",
                crate::channel::chain(&e)
            )
        })?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("gRPC health: {}: {}", s.code(), s.message()))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("gRPC health: {}", other.as_str_name())),
    }
}

/// Probes do not verify the application's certificate (neither does kubelet).
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_and_exec_probes_say_why_they_fail() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = Duration::from_secs(1);
        let tcp = Kind::Tcp {
            host: DEFAULT_HOST.into(),
            port,
        };
        assert_eq!(check(&tcp, t, None).await, Ok(()));
        drop(l);
        let e = check(&tcp, t, None).await.unwrap_err();
        assert!(e.contains("connect 127.0.0.1"), "{e}");

        let ok = Kind::Exec {
            command: vec!["true".into()],
        };
        assert_eq!(check(&ok, t, None).await, Ok(()));
        let bad = Kind::Exec {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo not ready >&2; exit 3".into(),
            ],
        };
        let e = check(&bad, t, None).await.unwrap_err();
        assert!(e.contains("not ready") && e.contains('3'), "{e}");
        let slow = Kind::Exec {
            command: vec!["sleep".into(), "5".into()],
        };
        let e = check(&slow, Duration::from_millis(100), None)
            .await
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }

    #[tokio::test]
    async fn grpc_probe_asks_the_health_service() {
        let (reporter, service) = tonic_health::server::health_reporter();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let kind = Kind::Grpc {
            port,
            service: "app".into(),
        };
        let t = Duration::from_secs(2);
        reporter
            .set_service_status("app", tonic_health::ServingStatus::Serving)
            .await;
        assert_eq!(check(&kind, t, None).await, Ok(()));
        reporter
            .set_service_status("app", tonic_health::ServingStatus::NotServing)
            .await;
        let e = check(&kind, t, None).await.unwrap_err();
        assert!(e.contains("NOT_SERVING"), "{e}");
        let unknown = Kind::Grpc {
            port,
            service: "other".into(),
        };
        let e = check(&unknown, t, None).await.unwrap_err();
        assert!(
            e.contains("NotFound") || e.contains("not found") || e.contains("unknown"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn http_probe_takes_2xx_and_3xx_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for status in ["200 OK", "302 Found", "500 Internal Server Error"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(req.starts_with("GET /ready HTTP/1.1"), "{req}");
                assert!(req.contains("x-probe: yes"), "{req}");
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let kind = Kind::Http(Http {
            host: DEFAULT_HOST.into(),
            port,
            path: "/ready".into(),
            https: false,
            headers: vec![("x-probe".into(), "yes".into())],
        });
        let t = Duration::from_secs(2);
        assert_eq!(check(&kind, t, None).await, Ok(()));
        assert_eq!(check(&kind, t, None).await, Ok(()));
        let e = check(&kind, t, None).await.unwrap_err();
        assert!(e.contains("500"), "{e}");
    }
}
