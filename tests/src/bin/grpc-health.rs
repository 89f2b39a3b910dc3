//! Test gRPC peer (grpc.health.v1 over tonic, h2c):
//! - `grpc-health serve NAME ADDR`: answers Check for the service NAME (SERVING; any other name
//!   NOT_FOUND, a trailers-only answer) and Watch with three messages, printing
//!   "NAME check SERVICE" / "NAME watch SERVICE" per call;
//! - `grpc-health check URL SERVICE N`: N unary calls on one HTTP/2 connection, one line each:
//!   `ok SERVING` or `err CODE`;
//! - `grpc-health watch URL SERVICE`: the Watch stream, `watch N` for the messages it carried.
//!
//! With GRPC_HEADER=name=value each call carries that metadata.

use std::io::Write;
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

struct Echo {
    name: String,
}

fn say(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Echo {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        say(format!("{} check {service}", self.name));
        if service != self.name {
            return Err(Status::not_found(format!("no service {service}")));
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        say(format!("{} watch {}", self.name, req.into_inner().service));
        let items = (0..3).map(|_| {
            Ok(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

async fn client(url: &str) -> anyhow::Result<HealthClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

fn request(service: &str) -> anyhow::Result<Request<HealthCheckRequest>> {
    let mut r = Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    if let Ok(h) = std::env::var("GRPC_HEADER") {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("GRPC_HEADER is name=value"))?;
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = k.parse()?;
        r.metadata_mut().insert(key, v.parse()?);
    }
    Ok(r)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", name, addr] => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            say(format!("{name} listening"));
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(Echo {
                    name: name.to_string(),
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await?;
        }
        ["check", url, service, n] => {
            let mut client = client(url).await?;
            for _ in 0..n.parse::<u32>()? {
                match client.check(request(service)?).await {
                    Ok(r) => say(format!(
                        "ok {}",
                        ServingStatus::try_from(r.into_inner().status)
                            .map(|s| s.as_str_name())
                            .unwrap_or("?")
                    )),
                    Err(s) => say(format!("err {:?}", s.code())),
                }
            }
        }
        ["watch", url, service] => {
            let mut client = client(url).await?;
            let mut stream = client.watch(request(service)?).await?.into_inner();
            let mut n = 0;
            while let Some(m) = stream.message().await? {
                let _ = m;
                n += 1;
            }
            say(format!("watch {n}"));
        }
        _ => anyhow::bail!(
            "usage: grpc-health serve NAME ADDR | check URL SERVICE N | watch URL SERVICE"
        ),
    }
    Ok(())
}
