use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use interceptor::config::{GatewayArgs, RunArgs};
use interceptor::mesh::{self, FileSource, DEFAULT_CLUSTER_DOMAIN, DEFAULT_NAMESPACE};

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "eBPF transparent interceptor that joins Linux VMs to an Istio service mesh"
)]
struct Cli {
    /// Log format
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Capture DNS and mesh traffic of a cgroup and serve it until SIGINT/SIGTERM
    Run(Box<RunArgs>),
    /// East-west gateway of a network: route mTLS by SNI to this network's endpoints, without
    /// terminating it (Istio AUTO_PASSTHROUGH); needs no privileges
    Gateway(Box<GatewayArgs>),
    /// Validate mesh files, print the table, exit 1 on error
    Check(CheckArgs),
    /// Ask the running daemon what it does with a name or address: DNS from the table or
    /// upstream, captured or not, which service, endpoints, gateways and SNI
    Explain(ExplainArgs),
    /// Ask the running daemon for its state: programs attached, cgroup, table, certificate
    Status(AdminArgs),
    /// Hand the running daemon's listeners and capture to a successor running the binary
    /// installed now, and return once it serves (the unit's ExecReload=: `systemctl reload`)
    Reload,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon's admin endpoint
    #[arg(long, value_name = "ADDR", default_value = interceptor::config::DEFAULT_ADMIN)]
    admin: std::net::SocketAddr,
    /// Print the daemon's JSON answer as is
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// HOST, HOST:PORT, IP:PORT or [IPv6]:PORT
    #[arg(required_unless_present = "inbound")]
    target: Option<String>,
    /// Instead: what inbound does on this port of the VM's own services (mTLS mode,
    /// AuthorizationPolicy)
    #[arg(long, value_name = "PORT", conflicts_with = "target")]
    inbound: Option<u16>,
    /// With --inbound: the client's SPIFFE id [default: a plaintext client]
    #[arg(long, value_name = "ID", requires = "inbound")]
    from: Option<String>,
    /// With --inbound: the client's address
    #[arg(long, value_name = "IP", requires = "inbound")]
    source: Option<std::net::IpAddr>,
    /// With --inbound on an HTTP port: judge a request for this path (and --method, --host)
    #[arg(long, value_name = "PATH", requires = "inbound")]
    path: Option<String>,
    /// With --path: the request's method
    #[arg(long, value_name = "METHOD", requires = "path", default_value = "GET")]
    method: String,
    /// With --path: the request's authority
    #[arg(long, value_name = "HOST", requires = "path")]
    host: Option<String>,
    /// The SNI the client's TLS hello names (routes by VirtualService tls sniHosts)
    #[arg(long, value_name = "NAME", conflicts_with = "inbound")]
    sni: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Istio YAML files or directories
    #[arg(long, num_args = 1.., required = true, value_name = "PATH")]
    mesh: Vec<PathBuf>,
    /// Istio meshNetworks YAML
    #[arg(long, value_name = "FILE")]
    mesh_networks: Option<PathBuf>,
    /// This VM's namespace
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Cluster DNS domain
    #[arg(long, default_value = DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Print the table as JSON
    #[arg(long)]
    json: bool,
}

fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let source = FileSource::new(args.mesh, args.mesh_networks, args.namespace.clone());
    let options = mesh::Options {
        namespace: args.namespace,
        cluster_domain: args.cluster_domain,
        registry_only: false,
    };
    let table = interceptor::daemon::check_table(&source, options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&table)?);
        return Ok(());
    }
    println!(
        "{} services, {} workloads, {} DNS names",
        table.services.len(),
        table.workloads.len(),
        table.names.len()
    );
    for svc in &table.services {
        let vips: Vec<String> = svc.vips.iter().map(ToString::to_string).collect();
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.number, p.protocol))
            .collect();
        println!(
            "service {} ({}) vips [{}]{} ports [{}] resolution {:?}",
            svc.host,
            svc.origin,
            vips.join(", "),
            if svc.auto_allocated { " (auto)" } else { "" },
            ports.join(", "),
            svc.resolution
        );
        for w in &svc.endpoints {
            let mtls = if w.speaks_istio_mtls() {
                "mTLS"
            } else {
                "plaintext"
            };
            let net = if w.network.is_empty() {
                "-"
            } else {
                &w.network
            };
            println!(
                "  endpoint {} ({}) network {} weight {} {:?} {}",
                w.address, w.name, net, w.weight, w.health, mtls
            );
        }
    }
    Ok(())
}

/// Runs one admin request on a small runtime.
fn ask<'a, F, Fut>(args: &'a AdminArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(&'a AdminArgs) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f(args))
}

/// Percent-encodes a query value (hosts and addresses carry `:`, `[`, `]`).
fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() -> ExitCode {
    // Two malloc arenas: threads that each keep one of their own grow the resident size with
    // memory no one uses (a big xDS push is decoded on one thread, freed on another).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Check(args) => check(args),
        Command::Run(args) => (*args)
            .resolve()
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                let mut rt = tokio::runtime::Builder::new_multi_thread();
                if let Some(n) = s.worker_threads {
                    rt.worker_threads(n);
                }
                rt.enable_all()
                    .build()?
                    .block_on(interceptor::daemon::run(s))
            }),
        Command::Explain(args) if args.inbound.is_some() => ask(&args.admin, |admin| async move {
            let path = format!(
                "/explain/inbound?port={}&identity={}&source={}&method={}&path={}&host={}",
                args.inbound.unwrap_or_default(),
                encode_query(args.from.as_deref().unwrap_or("")),
                args.source.map(|s| s.to_string()).unwrap_or_default(),
                encode_query(&args.method),
                encode_query(args.path.as_deref().unwrap_or("")),
                encode_query(args.host.as_deref().unwrap_or("")),
            );
            let v: interceptor::admin::InboundVerdict =
                interceptor::admin::get_json(admin.admin, &path).await?;
            if admin.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                interceptor::admin::print_inbound(&v);
            }
            Ok(())
        }),
        Command::Explain(args) => ask(&args.admin, |admin| async move {
            let target = args.target.unwrap_or_default();
            let mut path = format!("/explain?target={}", encode_query(&target));
            if let Some(sni) = &args.sni {
                path += &format!("&sni={}", encode_query(sni));
            }
            let v: interceptor::admin::Verdict =
                interceptor::admin::get_json(admin.admin, &path).await?;
            if admin.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                interceptor::admin::print_explain(&v);
            }
            Ok(())
        }),
        Command::Reload => interceptor::daemon::reload_helper().map(|pid| {
            println!("the successor (pid {pid}) serves; the previous process drains");
        }),
        Command::Status(args) => ask(&args, |admin| async move {
            let s: interceptor::admin::Status =
                interceptor::admin::get_json(admin.admin, "/status").await?;
            if admin.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                interceptor::admin::print_status(&s);
            }
            Ok(())
        }),
        Command::Gateway(args) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.worker_threads {
                rt.worker_threads(usize::from(n));
            }
            rt.enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(interceptor::daemon::gateway(*args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interceptor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
