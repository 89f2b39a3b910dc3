//! The CLI side of `interceptor explain` and `interceptor status`: ask the running daemon's
//! admin endpoint, print for a person.

use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::{AnsweredFrom, InboundVerdict, Status, Verdict};

/// GETs `path` from the admin endpoint at `admin` and parses the JSON answer.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    admin: SocketAddr,
    path: &str,
) -> anyhow::Result<T> {
    let stream = tokio::net::TcpStream::connect(admin).await.with_context(|| {
        format!("cannot reach the interceptor admin endpoint at {admin}: is `interceptor run` running (--admin)?")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{path}: {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected answer"))
}

pub fn print_inbound(v: &InboundVerdict) {
    println!(
        "port {}: mTLS {:?} (set by {})",
        v.port, v.mtls.mode, v.mtls.by
    );
    let client = v.identity.as_deref().unwrap_or("a plaintext client");
    if v.refused_as_plaintext {
        println!("{client} from {}: refused (plaintext in STRICT)", v.source);
        return;
    }
    match &v.request {
        Some(r) => println!("{client} from {} asking {r}: {}", v.source, v.decision),
        None => println!("{client} from {}: {}", v.source, v.decision),
    }
    if v.decision.needs_http && v.request.is_none() {
        println!(
            "{}",
            match v.protocol {
                crate::mesh::ListenerProtocol::Http => "a rule names a path, method, host or header: on this HTTP port each request is judged (give --path to judge one)",
                crate::mesh::ListenerProtocol::Auto => "a rule names a path, method, host or header: this port declares no protocol, so each request of a connection that speaks HTTP is judged (give --path to judge one); other connections fail the rule closed",
                crate::mesh::ListenerProtocol::Tcp => "a rule names a path, method, host or header: this port is not HTTP, so the rule fails closed (as Istio on TCP chains)",
            }
        );
    }
    if !v.decision.applicable.is_empty() {
        println!(
            "AuthorizationPolicies that apply: {}",
            v.decision.applicable.join(", ")
        );
    }
    if !v.decision.audited.is_empty() {
        println!("audited by: {}", v.decision.audited.join(", "));
    }
}

pub fn print_explain(v: &Verdict) {
    if let Some(d) = &v.dns {
        match d.answered_from {
            AnsweredFrom::MeshTable => {
                let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
                println!(
                    "DNS: {} is answered from the mesh table (service {}): {}",
                    d.name,
                    d.service.as_deref().unwrap_or("-"),
                    addrs.join(", ")
                );
            }
            AnsweredFrom::Upstream => {
                let ns: Vec<String> = d.upstream.iter().map(ToString::to_string).collect();
                println!(
                    "DNS: {} is not in the mesh: forwarded upstream to {}",
                    d.name,
                    if ns.is_empty() {
                        "(no nameservers: SERVFAIL)".into()
                    } else {
                        ns.join(", ")
                    }
                );
            }
        }
    }
    for c in &v.connections {
        println!(
            "connect {}: {} ({})",
            c.address,
            if c.captured {
                "CAPTURED"
            } else {
                "not captured"
            },
            c.why
        );
        if let Some(route) = &c.route {
            println!("  route: {route}");
        }
        if c.protocol == Some(crate::mesh::ListenerProtocol::Auto) && c.http.is_some() {
            println!("  the port declares no protocol: a connection whose first bytes are HTTP takes the http rules, any other its TCP route (--protocol-detection-timeout)");
        }
        for rule in c
            .http
            .as_ref()
            .and_then(|h| h["rules"].as_array())
            .into_iter()
            .flatten()
        {
            println!(
                "    http[{}] {}: matches {} -> {}",
                rule["index"],
                rule["name"].as_str().unwrap_or_default(),
                rule["matches"],
                rule["action"]
            );
        }
        for cl in &c.clusters {
            match &cl.refused {
                None => {
                    let p = &cl.policy;
                    let lb = p
                        .load_balancer
                        .map_or("LEAST_REQUEST (default)".to_string(), |l| format!("{l:?}"));
                    let pool = p.pool.unwrap_or_default();
                    println!(
                        "  cluster {} ({:.0}%): lb {lb}, maxConnections {}, connectTimeout {}, outlier {}",
                        cl.cluster,
                        cl.share * 100.0,
                        pool.max_connections
                            .map_or("unlimited".into(), |n| n.to_string()),
                        pool.connect_timeout_ms
                            .map_or("daemon's".into(), |t| format!("{t} ms")),
                        p.outlier.map_or("ours (failed endpoints tried last)".into(), |o| {
                            format!(
                                "{} in a row eject for {} ms",
                                o.consecutive_errors, o.base_ejection_ms
                            )
                        }),
                    );
                    println!("    tls {}", tls_summary(p.tls.as_ref()));
                }
                Some(why) => println!(
                    "  cluster {} ({:.0}%): REFUSED, {why}",
                    cl.cluster,
                    cl.share * 100.0
                ),
            }
        }
        for r in &c.routes {
            println!(
                "  -> {} via {} weight {:.2} {} endpoints [{}] in {}",
                r.connect_to,
                r.via,
                r.weight,
                match r.transport.as_str() {
                    "hbone" => "HBONE",
                    "double_hbone" => "double HBONE",
                    "tls_origination" => "TLS origination",
                    _ if r.mtls => "mTLS",
                    _ => "plaintext",
                },
                r.endpoints.join(", "),
                r.cluster
            );
            if let Some(sni) = &r.sni {
                println!(
                    "     SNI {sni} ALPN istio, server must be one of [{}]",
                    r.identities.join(", ")
                );
            }
            if let Some(authority) = &r.authority {
                if !r.gateway_identities.is_empty() {
                    println!(
                        "     outer CONNECT {authority} to the gateway, which must be one of [{}]",
                        r.gateway_identities.join(", ")
                    );
                }
                println!(
                    "     CONNECT {authority} over TLS 1.3 ALPN h2, server must be one of [{}]",
                    r.identities.join(", ")
                );
            }
        }
        for s in &c.skipped {
            println!(
                "  x  {} (network {:?}): {}",
                s.endpoint, s.network, s.reason
            );
        }
        if c.service.is_some() && c.routes.is_empty() {
            println!("  no reachable endpoint: the connection would be closed");
        }
    }
    if v.dns.is_none() && v.connections.is_empty() {
        println!("give a port too (IP:PORT or HOST:PORT) to see what a connection would do");
    }
}

pub fn print_status(s: &Status) {
    if s.ready {
        println!("ready: yes");
    } else {
        println!("ready: NO ({})", s.readiness.reason());
    }
    print_capture(s);
    println!("captured (VIP, port) entries: {}", s.captured_vips);
    print_table(s);
    if let Some(x) = &s.istiod {
        print_istiod(x);
    }
    print_identity(s);
    print_rest(s);
}

fn print_capture(s: &Status) {
    match &s.capture {
        Some(c) => {
            let cgroup = c.cgroup.as_ref().map(|p| p.display().to_string());
            println!(
                "capture: {} program(s) on cgroup {}: {}",
                c.programs.len(),
                cgroup.as_deref().unwrap_or("(none: --capture none)"),
                c.programs.join(", ")
            );
            if c.inbound_all || !c.inbound_ports.is_empty() {
                let ports: Vec<String> = c.inbound_ports.iter().map(ToString::to_string).collect();
                println!(
                    "inbound ports: {}",
                    if c.inbound_all {
                        "*".into()
                    } else {
                        ports.join(",")
                    }
                );
            }
        }
        None => println!("capture: not attached yet"),
    }
}

/// The table in force and each source's share of it.
fn print_table(s: &Status) {
    println!(
        "mesh table: version {}, {} services, {} workloads, {} DNS names, loaded {}s ago, {} rejected reloads",
        s.table.version,
        s.table.services,
        s.table.workloads,
        s.table.names,
        now_unix().saturating_sub(s.table.loaded_unix),
        s.table.reload_errors
    );
    for (source, st) in &s.sources {
        println!(
            "source {source}: {} services, {} workloads, published {}s ago, {} rejected{}",
            st.services,
            st.workloads,
            now_unix().saturating_sub(st.published_unix),
            st.rejected,
            if st.shadowed.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} hosts shadowed by a source of higher precedence",
                    st.shadowed.len()
                )
            }
        );
        if let Some(e) = &st.last_error {
            println!("  last load refused (the table above stays): {e}");
        }
    }
}

fn print_istiod(x: &crate::xds::XdsStatus) {
    println!(
        "istiod: {:?} ({}) to {}, {}s; {}{}{} reconnects",
        x.connection,
        x.protocol,
        x.server,
        now_unix().saturating_sub(x.since_unix),
        if x.synced {
            "in sync; "
        } else {
            "not synced yet; "
        },
        if x.from_persisted {
            "table from the persisted copy; "
        } else {
            ""
        },
        x.reconnects
    );
    for (ty, t) in &x.types {
        println!(
            "  {ty}: version {:?} nonce {:?}, {} resources, {} accepted, {} refused{}",
            t.version,
            t.nonce,
            t.resources,
            t.acks,
            t.nacks,
            t.last_nack
                .as_ref()
                .map(|n| format!("; last refusal: {n}"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &x.last_error {
        println!("  last error: {e}");
    }
    if x.last_push_unix > 0 {
        println!(
            "  last push {}s ago, applied in {:.1} ms",
            now_unix().saturating_sub(x.last_push_unix),
            x.last_apply_ms
        );
    }
}

/// The certificate and the Istio CA.
fn print_identity(s: &Status) {
    match &s.identity {
        Some(id) => println!(
            "identity: {} (serial {}) valid for {}h{}m",
            id.spiffe,
            id.serial,
            id.expires_in_s / 3600,
            id.expires_in_s % 3600 / 60
        ),
        None => println!("identity: none (no certificate: mTLS endpoints unreachable)"),
    }
    if let Some(ca) = &s.ca {
        let ago = |t: Option<u64>| {
            t.map(|t| format!("{}s ago", now_unix().saturating_sub(t)))
                .unwrap_or_else(|| "never".into())
        };
        println!(
            "istio ca: {} key; {} renewals (last {}{}), {} failures{}{}",
            ca.key,
            ca.renewals,
            ago(ca.last_renewal_unix),
            ca.last_renewal_ms
                .map(|ms| format!(", took {ms:.0} ms"))
                .unwrap_or_default(),
            ca.failures,
            ca.next_renewal_unix
                .map(|t| format!("; next renewal in {}s", t.saturating_sub(now_unix())))
                .unwrap_or_default(),
            if ca.expired {
                "; EXPIRED: outbound mTLS refused until the CA answers"
            } else {
                ""
            }
        );
        if let Some(e) = &ca.last_error {
            println!("  last error: {e}");
        }
        if let Some(e) = &ca.write_error {
            println!("  files not written: {e}");
        }
    }
}

/// The application probe, the network and how a restart goes.
fn print_rest(s: &Status) {
    if let Some(p) = &s.probe {
        let verdict = match p.healthy {
            Some(true) => "healthy".to_string(),
            Some(false) => format!("UNHEALTHY ({})", p.message),
            None => "not decided yet".to_string(),
        };
        println!(
            "application probe ({}): {verdict} for {}s; {} probes, {} failed",
            p.kind,
            (now_unix() * 1000).saturating_sub(p.since_unix_ms) / 1000,
            p.probes,
            p.failures
        );
    }
    let ns: Vec<String> = s.nameservers.iter().map(ToString::to_string).collect();
    println!(
        "network: {:?}; upstream DNS: {}; up {}s",
        s.network,
        ns.join(", "),
        s.uptime_s
    );
    let r = &s.restart;
    match (r.fd_store, r.generation) {
        (false, _) => println!("restart: a gap (no systemd descriptor store)"),
        (true, 0) => {
            println!("restart: hitless (systemd keeps listeners and capture); fresh start")
        }
        (true, g) => println!(
            "restart: hitless; generation {g}, adopted {} descriptors from the previous process",
            r.adopted
        ),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A cluster's upstream TLS as `explain` prints it.
fn tls_summary(t: Option<&crate::mesh::traffic::UpstreamTls>) -> String {
    let Some(t) = t else {
        return "auto (Istio mTLS where the endpoint speaks it)".into();
    };
    let mut out = t.mode.as_str().to_string();
    if let Some(sni) = &t.sni {
        out += &format!(", sni {sni}");
    }
    if !t.subject_alt_names.is_empty() {
        out += &format!(", SANs {:?}", t.subject_alt_names);
    }
    if t.originates() {
        out += &format!(
            ", CA {}",
            t.ca_certificates
                .as_ref()
                .map_or("system".into(), |p| p.display().to_string())
        );
    }
    if let (Some(c), Some(k)) = (&t.client_certificate, &t.private_key) {
        out += &format!(", client {} / {}", c.display(), k.display());
    }
    if t.insecure_skip_verify {
        out += ", server NOT verified (insecureSkipVerify)";
    }
    out
}
