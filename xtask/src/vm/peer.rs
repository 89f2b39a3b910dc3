//! The mesh around the guests, on the host's loopback: the mesh CA, and a "pod" whose sidecar
//! is a real TLS stack that is not ours (`openssl s_server`, demanding a client certificate the
//! mesh CA signed; `-rev` answers each line reversed, so an answer proves the bytes crossed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use interceptor_tests::certs::{Ca, Key};

pub const TRUST_DOMAIN: &str = "spiffe://cluster.local/ns/default/sa";

pub struct Mesh {
    pub ca: Ca,
    pub dir: PathBuf,
}

impl Mesh {
    pub fn new(dir: &Path) -> anyhow::Result<Mesh> {
        fs::create_dir_all(dir)?;
        Ok(Mesh {
            ca: Ca::new("interceptor vm-test mesh CA"),
            dir: dir.to_path_buf(),
        })
    }

    /// cert-chain.pem, key.pem, root-cert.pem for service account `sa` (Istio's VM layout).
    pub fn certs(&self, sa: &str) -> PathBuf {
        self.ca.issue(
            &self.dir.join(format!("certs-{sa}")),
            &format!("{TRUST_DOMAIN}/{sa}"),
            Key::Ecdsa,
        )
    }
}

/// A process of ours on the host, ended by PID when dropped.
pub struct HostProc {
    child: Child,
    log: PathBuf,
}

impl HostProc {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The pod: TLS on 127.0.0.1:`port` with the identity of `sa`, client certificates required
/// and verified against the mesh CA.
pub fn pod(mesh: &Mesh, sa: &str, port: u16) -> anyhow::Result<HostProc> {
    let certs = mesh.certs(sa);
    let log = mesh.dir.join(format!("pod-{sa}.log"));
    let mut c = Command::new("openssl");
    c.args(["s_server", "-rev", "-Verify", "1", "-verify_return_error"])
        .arg("-accept")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("-key")
        .arg(certs.join("key.pem"))
        .arg("-CAfile")
        .arg(certs.join("root-cert.pem"))
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(&log)?.try_clone()?);
    interceptor_tests::die_with_parent(&mut c);
    let child = c.spawn().with_context(|| format!("cannot start {c:?}"))?;
    let p = HostProc { child, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("openssl s_server did not listen on {port}: {}", p.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(p)
}

/// One line over mTLS from the host into a guest's port (forwarded to 127.0.0.1:`port`), as
/// service account `sa`, with a real client that is not ours (the server's chain verified
/// against the mesh CA); what came back.
pub fn mtls_line(mesh: &Mesh, sa: &str, port: u16, line: &str) -> anyhow::Result<String> {
    let certs = mesh.certs(sa);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(echo '{line}'; sleep 3) | timeout 20 openssl s_client -quiet -no_ign_eof -connect \
             127.0.0.1:{port} -cert {c} -key {k} -CAfile {r} -verify_return_error -alpn istio 2>&1",
            c = certs.join("cert-chain.pem").display(),
            k = certs.join("key.pem").display(),
            r = certs.join("root-cert.pem").display(),
        ))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod that serves many clients at once, for load, as a real pod would: Envoy as istiod
/// configures a sidecar's inbound (mTLS with client certificates required, the istio ALPNs) in
/// front of an app that echoes lines (socat forking a `cat` per connection). Two processes.
pub fn envoy_pod(mesh: &Mesh, sa: &str, port: u16) -> anyhow::Result<[HostProc; 2]> {
    let app_port = super::guest::free_port()?;
    let admin = super::guest::free_port()?;
    let app = spawn(
        Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{app_port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg("EXEC:cat"),
        &mesh.dir.join(format!("echo-app-{sa}.log")),
    )?;
    let config = mesh.dir.join(format!("envoy-{sa}.json"));
    fs::write(
        &config,
        interceptor_tests::envoy::inbound_config(
            &mesh.certs(sa),
            "127.0.0.1",
            port,
            app_port,
            admin,
        ),
    )?;
    let envoy = spawn(
        Command::new(interceptor_tests::envoy::envoy_bin())
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]),
        &mesh.dir.join(format!("envoy-{sa}.log")),
    )?;
    for (p, what) in [(app_port, &app), (port, &envoy)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            if Instant::now() > deadline {
                bail!("the echo pod did not listen on {p}: {}", what.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok([app, envoy])
}

fn spawn(c: &mut Command, log: &Path) -> anyhow::Result<HostProc> {
    c.stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(fs::File::create(log)?.try_clone()?);
    interceptor_tests::die_with_parent(c);
    let child = c.spawn().with_context(|| format!("cannot start {c:?}"))?;
    Ok(HostProc {
        child,
        log: log.to_path_buf(),
    })
}
