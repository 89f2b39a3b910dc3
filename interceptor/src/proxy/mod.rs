//! The three TCP data paths: outbound (captured connections to mesh services), inbound (mTLS for
//! this VM's own services) and the east-west gateway (SNI routing between networks); `http` and
//! `pool` are what the outbound and inbound HTTP paths share. Policy is in `route`, dialing in
//! `transport`, sockets in `net`.

mod body;
mod breaker;
mod gateway;
mod http;
mod inbound;
mod outbound;
mod pool;

pub use gateway::{route as gateway_route, ExposeIstiod, Gateway, Refusal};
pub use inbound::Inbound;
pub use outbound::{Outbound, MAX_ATTEMPTS};
