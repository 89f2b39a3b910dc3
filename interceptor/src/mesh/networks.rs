//! meshNetworks (A: mesh/v1alpha1/network.proto): which network an endpoint is in and the
//! gateways through which another network is reached.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::model::Address;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Networks {
    pub networks: BTreeMap<String, Network>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Network {
    pub cidrs: Vec<Cidr>,
    pub registries: Vec<String>,
    pub gateways: Vec<Gateway>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub address: Address,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR")]
    NotAnAddress(String),
    #[error("{0:?} has a bad prefix length")]
    BadPrefix(String),
}

/// A meshNetworks document that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworksError {
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("networks.{network}.endpoints[{index}].fromCidr: {source}")]
    Cidr {
        network: String,
        index: usize,
        source: CidrError,
    },
    #[error("networks.{network}.endpoints[{index}]: exactly one of fromCidr, fromRegistry")]
    Endpoint { network: String, index: usize },
    #[error("networks.{network}.gateways[{index}]: exactly one of address, registryServiceName")]
    Gateway { network: String, index: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::BadPrefix(s.to_string()))?
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> (u128, u8) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        }
        let ((net, width), (ip, ip_width)) = (bits(self.addr), bits(ip));
        if width != ip_width {
            return false;
        }
        let shift = u32::from(width - self.prefix);
        shift >= 128 || (net >> shift) == (ip >> shift)
    }
}

impl Networks {
    /// The network whose fromCidr holds `ip`, if any.
    pub fn network_of(&self, ip: IpAddr) -> Option<&str> {
        self.networks
            .iter()
            .find(|(_, n)| n.cidrs.iter().any(|c| c.contains(ip)))
            .map(|(name, _)| name.as_str())
    }

    /// Is any network reached through a gateway? Without one the mesh is flat: every endpoint
    /// is reached directly (Istio's multi-network is off).
    pub fn has_gateways(&self) -> bool {
        self.networks.values().any(|n| !n.gateways.is_empty())
    }

    pub fn gateways(&self, network: &str) -> &[Gateway] {
        self.networks
            .get(network)
            .map(|n| n.gateways.as_slice())
            .unwrap_or(&[])
    }

    /// Parses a meshNetworks document (`networks:` at the top).
    pub fn from_yaml(text: &str) -> Result<Self, NetworksError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            networks: BTreeMap<String, RawNetwork>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawNetwork {
            #[serde(default)]
            endpoints: Vec<RawEndpoint>,
            #[serde(default)]
            gateways: Vec<RawGateway>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct RawEndpoint {
            from_cidr: Option<String>,
            from_registry: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct RawGateway {
            address: Option<String>,
            registry_service_name: Option<String>,
            port: u16,
            #[serde(default)]
            #[allow(dead_code)]
            locality: Option<String>,
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let file: File =
            serde_path_to_error::deserialize(de).map_err(|e| NetworksError::Syntax {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        let mut out = Networks::default();
        for (name, raw) in file.networks {
            let mut net = Network::default();
            for (i, ep) in raw.endpoints.into_iter().enumerate() {
                match (ep.from_cidr, ep.from_registry) {
                    (Some(c), None) => {
                        net.cidrs
                            .push(Cidr::parse(&c).map_err(|source| NetworksError::Cidr {
                                network: name.clone(),
                                index: i,
                                source,
                            })?)
                    }
                    (None, Some(r)) => net.registries.push(r),
                    _ => {
                        return Err(NetworksError::Endpoint {
                            network: name,
                            index: i,
                        })
                    }
                }
            }
            for (i, gw) in raw.gateways.into_iter().enumerate() {
                let address = match (gw.address, gw.registry_service_name) {
                    (Some(a), None) => a.parse().map(Address::Ip).unwrap_or(Address::Hostname(a)),
                    (None, Some(s)) => Address::Hostname(s),
                    _ => {
                        return Err(NetworksError::Gateway {
                            network: name,
                            index: i,
                        })
                    }
                };
                net.gateways.push(Gateway {
                    address,
                    port: gw.port,
                });
            }
            out.networks.insert(name, net);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mesh_networks() {
        let n = Networks::from_yaml(
            "networks:\n  network-b:\n    endpoints: [{fromCidr: 10.2.0.0/16}]\n    gateways: [{address: 192.0.2.10, port: 15443}]\n  network-a:\n    endpoints: [{fromRegistry: cluster-a}]\n",
        )
        .unwrap();
        assert_eq!(n.network_of("10.2.3.4".parse().unwrap()), Some("network-b"));
        assert_eq!(n.network_of("10.3.3.4".parse().unwrap()), None);
        assert_eq!(n.gateways("network-b")[0].port, 15443);
        assert!(n.gateways("network-a").is_empty());
    }

    #[test]
    fn bad_gateway_names_the_field() {
        let e = Networks::from_yaml("networks:\n  b:\n    gateways: [{port: 1}]\n").unwrap_err();
        assert!(e.to_string().contains("networks.b.gateways[0]"), "{e}");
        let e = Networks::from_yaml("networks:\n  b:\n    gatways: []\n").unwrap_err();
        assert!(e.to_string().contains("gatways"), "{e}");
        let e = Networks::from_yaml("networks:\n  b:\n    endpoints: [{fromCidr: 10.0.0.0/40}]\n")
            .unwrap_err();
        assert!(matches!(
            e,
            NetworksError::Cidr {
                source: CidrError::BadPrefix(_),
                ..
            }
        ));
    }
}
