//! `mesh::Table`: one immutable snapshot of the mesh, with the indices the data paths need.
//! Sources produce `Resources`; `Table::build` resolves selectors, allocates VIPs and indexes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::model::{Host, Location, Resolution, Service, ServicePort, Workload, WorkloadGroup};
use super::names::NameTable;
use super::networks::Networks;
use super::vip;

/// Settings of this VM that shape the table (name variants, default namespace).
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub namespace: String,
    pub cluster_domain: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// A ServiceEntry as a source declares it, before selectors and VIPs are resolved.
#[derive(Clone, Debug, Default)]
pub struct ServiceDecl {
    pub origin: String,
    pub namespace: String,
    pub hosts: Vec<Host>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub location: Location,
    pub subject_alt_names: Vec<String>,
    pub selector: Option<BTreeMap<String, String>>,
    pub endpoints: Vec<Workload>,
}

/// Everything a source knows, in source-neutral form.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub services: Vec<ServiceDecl>,
    pub workloads: Vec<Workload>,
    pub groups: Vec<WorkloadGroup>,
    pub networks: Networks,
}

#[derive(Debug, Default, Serialize)]
pub struct Table {
    /// Set by `Store::publish`; 0 before.
    pub version: u64,
    /// When the store took this table in force (seconds since the epoch).
    pub loaded_unix: u64,
    pub options: Options,
    pub services: Vec<Arc<Service>>,
    pub workloads: Vec<Arc<Workload>>,
    pub groups: Vec<WorkloadGroup>,
    pub networks: Networks,
    pub names: NameTable,
    #[serde(skip)]
    by_vip: HashMap<(IpAddr, u16), usize>,
    #[serde(skip)]
    by_host: HashMap<Host, usize>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Table {
    pub fn build(res: Resources, options: Options) -> Table {
        let networks = res.networks;
        let with_network = |mut w: Workload| {
            if w.network.is_empty() {
                if let super::model::Address::Ip(ip) = w.address {
                    if let Some(n) = networks.network_of(ip) {
                        w.network = n.to_string();
                    }
                }
            }
            Arc::new(w)
        };
        let workloads: Vec<Arc<Workload>> = res.workloads.into_iter().map(with_network).collect();

        let mut decls = res.services;
        // A stable order makes "first wins" on duplicate hosts independent of file order.
        decls.sort_by(|a, b| a.origin.cmp(&b.origin));
        let needs_vip = decls
            .iter()
            .filter(|d| d.addresses.is_empty() && d.resolution != Resolution::None)
            .flat_map(|d| d.hosts.iter().filter(|h| !h.is_wildcard()));
        let allocated = vip::allocate(needs_vip);

        let mut services = Vec::new();
        let mut by_host = HashMap::new();
        for d in decls {
            let endpoints: Vec<Arc<Workload>> = match &d.selector {
                Some(sel) => workloads
                    .iter()
                    .filter(|w| w.namespace == d.namespace && selects(sel, &w.labels))
                    .cloned()
                    .collect(),
                None => d.endpoints.iter().cloned().map(with_network).collect(),
            };
            for host in &d.hosts {
                if by_host.contains_key(host) {
                    tracing::warn!(%host, origin = %d.origin, "host already defined by another ServiceEntry; ignored");
                    continue;
                }
                let (vips, auto_allocated) = match allocated.get(host) {
                    Some((v4, v6)) if d.addresses.is_empty() => {
                        (vec![IpAddr::V4(*v4), IpAddr::V6(*v6)], true)
                    }
                    _ => (d.addresses.clone(), false),
                };
                by_host.insert(host.clone(), services.len());
                services.push(Arc::new(Service {
                    host: host.clone(),
                    origin: d.origin.clone(),
                    namespace: d.namespace.clone(),
                    vips,
                    auto_allocated,
                    ports: d.ports.clone(),
                    resolution: d.resolution,
                    location: d.location,
                    subject_alt_names: d.subject_alt_names.clone(),
                    endpoints: endpoints.clone(),
                }));
            }
        }

        let mut by_vip = HashMap::new();
        for (i, svc) in services.iter().enumerate() {
            for ip in &svc.vips {
                for p in &svc.ports {
                    if let Some(prev) = by_vip.insert((*ip, p.number), i) {
                        tracing::warn!(vip = %ip, port = p.number, first = %services[prev].host, second = %svc.host, "two services claim one address and port; the first keeps it");
                        by_vip.insert((*ip, p.number), prev);
                    }
                }
            }
        }
        let names = NameTable::build(
            services.iter().map(|s| s.as_ref()),
            &options.namespace,
            &options.cluster_domain,
        );
        Table {
            version: 0,
            loaded_unix: 0,
            options,
            services,
            workloads,
            groups: res.groups,
            networks,
            names,
            by_vip,
            by_host,
        }
    }

    /// The service and port a captured connection to `dst` (a VIP:port) is for.
    pub fn service_for(&self, dst: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let svc = &self.services[*self.by_vip.get(&(ip, dst.port()))?];
        Some((svc, svc.port(dst.port())?))
    }

    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host
            .get(&Host::new(host))
            .map(|i| &self.services[*i])
    }

    /// Every (VIP, port) the kernel must capture.
    pub fn captured(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_vip
            .keys()
            .map(|(ip, port)| SocketAddr::new(*ip, *port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::model::{Address, Health};

    pub(crate) fn workload(ns: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: format!("{ns}/{ip}"),
            namespace: ns.into(),
            address: Address::Ip(ip.parse().unwrap()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: BTreeMap::new(),
            network: String::new(),
            locality: String::new(),
            weight: 1,
            service_account: "default".into(),
            health: Health::Healthy,
        }
    }

    fn product() -> ServiceDecl {
        ServiceDecl {
            origin: "default/product".into(),
            namespace: "default".into(),
            hosts: vec![Host::new("product.default.svc.cluster.local")],
            ports: vec![ServicePort {
                number: 8080,
                name: "http".into(),
                protocol: "HTTP".into(),
                target_port: Some(9080),
            }],
            resolution: Resolution::Static,
            selector: Some([("app".to_string(), "product".to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn selector_vip_and_lookup() {
        let res = Resources {
            services: vec![product()],
            workloads: vec![
                workload("default", "10.0.0.2", &[("app", "product")]),
                workload("default", "10.0.0.3", &[("app", "other")]),
                workload("other", "10.0.0.4", &[("app", "product")]),
            ],
            ..Default::default()
        };
        let t = Table::build(res, Options::default());
        let svc = t
            .service_by_host("product.default.svc.cluster.local")
            .unwrap();
        assert_eq!(svc.endpoints.len(), 1);
        assert!(svc.auto_allocated);
        let vip = svc.vips[0];
        let (found, port) = t.service_for(SocketAddr::new(vip, 8080)).unwrap();
        assert_eq!(found.host, svc.host);
        assert_eq!(svc.endpoints[0].target_port(port), 9080);
        assert!(t.service_for(SocketAddr::new(vip, 8081)).is_none());
        assert_eq!(t.captured().count(), 2); // v4 and v6 VIP
        for name in [
            "product.default.svc.cluster.local",
            "product.default",
            "product.default.svc",
            "product",
        ] {
            assert!(t.names.lookup(name).is_some(), "{name}");
        }
    }

    #[test]
    fn short_name_only_in_own_namespace() {
        let res = Resources {
            services: vec![product()],
            ..Default::default()
        };
        let t = Table::build(
            res,
            Options {
                namespace: "other".into(),
                cluster_domain: "cluster.local".into(),
            },
        );
        assert!(t.names.lookup("product").is_none());
        assert!(t.names.lookup("product.default").is_some());
    }

    #[test]
    fn wildcard_and_network_by_cidr() {
        let mut wild = product();
        wild.origin = "default/wild".into();
        wild.hosts = vec![Host::new("*.example.com")];
        wild.addresses = vec!["192.0.2.1".parse().unwrap()];
        wild.selector = None;
        wild.endpoints = vec![workload("default", "10.2.0.9", &[])];
        let res = Resources {
            services: vec![wild],
            networks: Networks::from_yaml(
                "networks:\n  b:\n    endpoints: [{fromCidr: 10.2.0.0/16}]\n",
            )
            .unwrap(),
            ..Default::default()
        };
        let t = Table::build(res, Options::default());
        assert_eq!(
            t.names.lookup("a.example.com").unwrap().v4,
            vec!["192.0.2.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert!(t.names.lookup("example.com").is_none());
        assert_eq!(t.services[0].endpoints[0].network, "b");
    }
}
