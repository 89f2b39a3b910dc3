//! `mesh::Table`: one immutable snapshot of the mesh, with the indices the data paths need.
//! Sources produce `Resources`; `Table::build` resolves selectors, allocates VIPs and indexes.
//! Building is in two layers: the *shape* (services, their VIPs, ports, the address and host
//! indices and the derived name table) and the *endpoints*. A new table whose shape equals the
//! previous one's reuses it and only resolves endpoints again, so an endpoint-only change (the
//! usual EDS push) never re-allocates VIPs or rebuilds the name table; a service whose
//! endpoints did not change keeps its `Arc`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::http_route::VirtualHostRoutes;
use super::model::{
    Address, Host, Location, PortEndpoints, Resolution, Service, ServicePort, Workload,
    WorkloadGroup, DEFAULT_CLUSTER_DOMAIN, DEFAULT_NAMESPACE,
};
use super::model::{ClusterPolicy, ListenerProtocol, SubsetEndpoints};
use super::names::NameTable;
use super::networks::Networks;
use super::policy::{AuthorizationPolicy, PeerAuthentication};
use super::traffic::{DestinationRule, ListenerRoute, VirtualService};
use super::vip;

/// The traffic intent of a table, indexed by host (files) and by listener address (istiod).
#[derive(Debug, Default, Serialize)]
pub struct Traffic {
    /// In Istio's order: by creation time, then namespace/name.
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub listener_routes: Vec<Arc<ListenerRoute>>,
    /// istiod's HTTP routes (RDS virtual hosts; those with no rules only say the port is HTTP).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_hosts: Vec<Arc<VirtualHostRoutes>>,
    /// Service ports istiod serves as HTTP (an RDS virtual host names them), and whether it
    /// sniffs them (their route configuration is the port's own, `"<fqdn>:<port>"`).
    #[serde(skip)]
    http_services: HashMap<(Host, u16), ListenerProtocol>,
    /// istiod's inbound intent: when present, it decides inbound (not the files' policies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Arc<super::inbound::InboundIntent>>,
    #[serde(skip)]
    by_http_host: HashMap<(Host, u16), usize>,
    #[serde(skip)]
    vs_by_host: HashMap<Host, Vec<usize>>,
    #[serde(skip)]
    vs_wildcard: Vec<usize>,
    #[serde(skip)]
    dr_by_host: HashMap<Host, Vec<usize>>,
    #[serde(skip)]
    dr_wildcard: Vec<usize>,
    #[serde(skip)]
    by_listener: HashMap<SocketAddr, usize>,
    #[serde(skip)]
    catch_all: Option<usize>,
}

fn by_created<T>(
    created: impl Fn(&T) -> (Option<&str>, &str),
) -> impl Fn(&Arc<T>, &Arc<T>) -> std::cmp::Ordering {
    move |a, b| {
        let (ca, na) = created(a);
        let (cb, nb) = created(b);
        // Without a timestamp, file order (a stable sort keeps it).
        match (ca, cb) {
            (Some(x), Some(y)) => x.cmp(y).then(na.cmp(nb)),
            _ => std::cmp::Ordering::Equal,
        }
    }
}

impl Traffic {
    fn build(res: &Resources, options: &Options) -> Traffic {
        let mut virtual_services: Vec<Arc<VirtualService>> = res
            .virtual_services
            .iter()
            .map(|v| {
                let mut v = VirtualService::clone(v);
                v.resolve(&options.cluster_domain);
                Arc::new(v)
            })
            .collect();
        virtual_services.sort_by(by_created(|v: &VirtualService| {
            (v.created.as_deref(), v.name.as_str())
        }));
        let mut destination_rules: Vec<Arc<DestinationRule>> = res
            .destination_rules
            .iter()
            .map(|d| {
                let mut d = DestinationRule::clone(d);
                d.resolve(&options.cluster_domain);
                Arc::new(d)
            })
            .collect();
        destination_rules.sort_by(by_created(|d: &DestinationRule| {
            (d.created.as_deref(), d.name.as_str())
        }));
        let mut t = Traffic {
            listener_routes: res.listener_routes.clone(),
            http_hosts: res.http_hosts.clone(),
            inbound: res.inbound.clone(),
            ..Default::default()
        };
        for (i, h) in t.http_hosts.iter().enumerate() {
            let protocol = match h.route_config == h.port.to_string() {
                true => ListenerProtocol::Http,
                false => ListenerProtocol::Auto,
            };
            t.http_services
                .entry((h.host.clone(), h.port))
                .or_insert(protocol);
            if !h.rules.is_empty() {
                t.by_http_host.entry((h.host.clone(), h.port)).or_insert(i);
            }
        }
        for (i, v) in virtual_services.iter().enumerate() {
            for h in &v.hosts {
                if h.is_wildcard() {
                    t.vs_wildcard.push(i);
                } else {
                    t.vs_by_host.entry(h.clone()).or_default().push(i);
                }
            }
        }
        for (i, d) in destination_rules.iter().enumerate() {
            if d.host.is_wildcard() {
                t.dr_wildcard.push(i);
            } else {
                t.dr_by_host.entry(d.host.clone()).or_default().push(i);
            }
        }
        for (i, l) in t.listener_routes.iter().enumerate() {
            match l.address {
                Some(a) => {
                    t.by_listener.insert(a, i);
                }
                None => t.catch_all = Some(i),
            }
        }
        t.virtual_services = virtual_services;
        t.destination_rules = destination_rules;
        t
    }

    pub fn is_empty(&self) -> bool {
        self.virtual_services.is_empty()
            && self.destination_rules.is_empty()
            && self.listener_routes.is_empty()
            && self.http_hosts.is_empty()
    }

    /// istiod's HTTP routes for a service port, if a VirtualService made some.
    /// Whether istiod serves `host`'s `port` as HTTP (its RDS has a virtual host for it).
    pub fn is_http_service(&self, host: &Host, port: u16) -> bool {
        self.http_protocol(host, port).is_some()
    }

    /// How istiod serves `host`'s `port` when it serves it as HTTP: declared (RDS `"<port>"`)
    /// or sniffed (RDS `"<fqdn>:<port>"`, sheet 1.2).
    pub fn http_protocol(&self, host: &Host, port: u16) -> Option<ListenerProtocol> {
        if self.http_services.is_empty() {
            return None;
        }
        self.http_services.get(&(host.clone(), port)).copied()
    }

    pub fn http_host(&self, host: &Host, port: u16) -> Option<&Arc<VirtualHostRoutes>> {
        if self.by_http_host.is_empty() {
            return None;
        }
        self.by_http_host
            .get(&(host.clone(), port))
            .map(|i| &self.http_hosts[*i])
    }

    /// Whether any VirtualService may name `host` (without allocating: the per-connection
    /// fast path for services no route touches).
    pub fn may_route(&self, host: &Host) -> bool {
        !self.vs_wildcard.is_empty() || self.vs_by_host.contains_key(host)
    }

    /// Whether any DestinationRule may apply to `host`.
    pub fn may_have_rule(&self, host: &Host) -> bool {
        !self.dr_wildcard.is_empty() || self.dr_by_host.contains_key(host)
    }

    /// The VirtualServices naming `host` (exactly, or by a wildcard), in Istio's order.
    pub fn virtual_services_for<'a>(
        &'a self,
        host: &'a Host,
    ) -> impl Iterator<Item = &'a Arc<VirtualService>> + 'a {
        let mut idx: Vec<usize> = self.vs_by_host.get(host).cloned().unwrap_or_default();
        idx.extend(
            self.vs_wildcard
                .iter()
                .filter(|i| {
                    self.virtual_services[**i]
                        .hosts
                        .iter()
                        .any(|h| h.matches(host.as_str()))
                })
                .copied(),
        );
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| &self.virtual_services[i])
    }

    /// The DestinationRules for `host`: exact ones first, then wildcards, each in Istio's order.
    pub fn destination_rules_for<'a>(
        &'a self,
        host: &'a Host,
    ) -> impl Iterator<Item = &'a Arc<DestinationRule>> + 'a {
        let exact = self.dr_by_host.get(host).into_iter().flatten();
        let wild = self
            .dr_wildcard
            .iter()
            .filter(|i| self.destination_rules[**i].host.matches(host.as_str()));
        exact.chain(wild).map(|i| &self.destination_rules[*i])
    }

    /// istiod's route for connections to `dst` (its `<VIP>_<port>` listener), if it sent one.
    pub fn listener_route(&self, dst: SocketAddr) -> Option<&Arc<ListenerRoute>> {
        self.by_listener
            .get(&dst)
            .map(|i| &self.listener_routes[*i])
    }

    /// istiod's `virtualOutbound` (where connections with no listener of their own go).
    pub fn catch_all(&self) -> Option<&Arc<ListenerRoute>> {
        self.catch_all.map(|i| &self.listener_routes[i])
    }
}

/// Settings of this VM that shape the table (name variants, default namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Options {
    pub namespace: String,
    pub cluster_domain: String,
    /// `--outbound-traffic-policy registry-only`: what holds unless istiod's `virtualOutbound`
    /// says otherwise.
    pub registry_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            registry_only: false,
        }
    }
}

/// A service as a source declares it (a ServiceEntry, or istiod's clusters for one host),
/// before selectors and VIPs are resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceDecl {
    pub origin: String,
    pub namespace: String,
    pub hosts: Vec<Host>,
    pub addresses: Vec<IpAddr>,
    /// Give VIPs to hosts without addresses (files; istiod allocates its own).
    pub allocate_vips: bool,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub location: Location,
    pub subject_alt_names: Vec<String>,
    pub selector: Option<BTreeMap<String, String>>,
    pub endpoints: Vec<Arc<Workload>>,
    /// Endpoints per service port, when the source knows them per port (EDS is per cluster):
    /// such a port uses these, not `endpoints`.
    pub port_endpoints: PortEndpoints,
    /// Endpoints are reached as given, with no network rule of ours on top (istiod's).
    pub endpoints_as_given: bool,
    /// The source's own name table has this service's names (istiod's NDS): none derived.
    pub names_given: bool,
    /// Subset endpoints the source gave (istiod's subset clusters).
    pub subsets: Vec<SubsetEndpoints>,
    /// Cluster policies the source gave (istiod's CDS); None: from DestinationRules.
    pub policies: Option<Vec<ClusterPolicy>>,
}

impl ServiceDecl {
    /// Everything but the endpoints: what VIPs, indices and names are made of.
    fn same_shape(&self, other: &ServiceDecl) -> bool {
        self.origin == other.origin
            && self.namespace == other.namespace
            && self.hosts == other.hosts
            && self.addresses == other.addresses
            && self.allocate_vips == other.allocate_vips
            && self.ports == other.ports
            && self.resolution == other.resolution
            && self.location == other.location
            && self.subject_alt_names == other.subject_alt_names
            && self.endpoints_as_given == other.endpoints_as_given
            && self.names_given == other.names_given
    }
}

/// Everything a source knows, in source-neutral form.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    /// Shared, so a source that keeps its decls can hand them in again without copying.
    pub services: Vec<Arc<ServiceDecl>>,
    pub workloads: Vec<Arc<Workload>>,
    pub groups: Vec<WorkloadGroup>,
    pub networks: Networks,
    /// A name table the source computed (istiod's NDS). None: names are derived from the
    /// services, with Istio's variants.
    pub names: Option<Arc<NameTable>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// From files: as written (short hosts resolved by the table).
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// From istiod: its routes for this proxy, already evaluated.
    pub listener_routes: Vec<Arc<ListenerRoute>>,
    pub http_hosts: Vec<Arc<VirtualHostRoutes>>,
    /// From istiod: `virtualInbound` (inbound mTLS modes and authorization for this VM).
    pub inbound: Option<Arc<super::inbound::InboundIntent>>,
}

/// The shape layer, shared by every table built on it.
#[derive(Debug, Default)]
struct Shape {
    /// In origin order.
    decls: Vec<Arc<ServiceDecl>>,
    networks: Networks,
    /// Per service: its decl and host.
    services: Vec<(usize, Host, Vec<IpAddr>, bool)>,
    by_vip: HashMap<(IpAddr, u16), usize>,
    by_host: HashMap<Host, usize>,
    derived_names: Arc<NameTable>,
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
    pub names: Arc<NameTable>,
    /// In source order (file order for the file source): "the oldest wins" falls back on it.
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub traffic: Arc<Traffic>,
    #[serde(skip)]
    shape: Arc<Shape>,
    /// The name table a source gave, if any (to tell a changed one from the same).
    #[serde(skip)]
    provided_names: Option<Arc<NameTable>>,
    /// The decls this table was built from, in shape order.
    #[serde(skip)]
    decls: Vec<Arc<ServiceDecl>>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Workloads by (namespace, label, value), so a selector is resolved without scanning every
/// workload for every service.
struct SelectorIndex<'a> {
    workloads: &'a [Arc<Workload>],
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    by_namespace: HashMap<&'a str, Vec<usize>>,
}

impl<'a> SelectorIndex<'a> {
    fn new(workloads: &'a [Arc<Workload>]) -> Self {
        let mut by_label: HashMap<_, Vec<usize>> = HashMap::new();
        let mut by_namespace: HashMap<_, Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            by_namespace
                .entry(w.namespace.as_str())
                .or_default()
                .push(i);
            for (k, v) in w.labels.iter() {
                by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Self {
            workloads,
            by_label,
            by_namespace,
        }
    }

    fn select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Arc<Workload>> {
        let mut smallest: Option<&Vec<usize>> = self.by_namespace.get(namespace);
        for (k, v) in selector {
            match self.by_label.get(&(namespace, k.as_str(), v.as_str())) {
                Some(c) if smallest.is_none_or(|s| c.len() < s.len()) => smallest = Some(c),
                Some(_) => {}
                None => return vec![],
            }
        }
        smallest
            .map(|c| {
                c.iter()
                    .map(|i| &self.workloads[*i])
                    .filter(|w| selects(selector, &w.labels))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A workload's network: its own, else the meshNetworks network whose fromCidr holds it.
fn with_network(w: &Arc<Workload>, networks: &Networks) -> Arc<Workload> {
    if w.network.is_empty() {
        if let Address::Ip(ip) = w.address {
            if let Some(n) = networks.network_of(ip) {
                let mut w2 = Workload::clone(w);
                w2.network = n.to_string();
                return Arc::new(w2);
            }
        }
    }
    w.clone()
}

/// A service's endpoints: for every port, and per port.
type Endpoints = (Vec<Arc<Workload>>, PortEndpoints);

fn same_arcs<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

impl Shape {
    fn build(decls: Vec<Arc<ServiceDecl>>, networks: Networks, options: &Options) -> Shape {
        let needs_vip = decls
            .iter()
            .filter(|d| {
                d.allocate_vips && d.addresses.is_empty() && d.resolution != Resolution::None
            })
            .flat_map(|d| d.hosts.iter().filter(|h| !h.is_wildcard()));
        let allocated = vip::allocate(needs_vip);

        let mut services = Vec::new();
        let mut by_host = HashMap::new();
        for (i, d) in decls.iter().enumerate() {
            for host in &d.hosts {
                if by_host.contains_key(host) {
                    tracing::warn!(%host, origin = %d.origin, "host already defined by another service; ignored");
                    continue;
                }
                let (vips, auto_allocated) = match allocated.get(host) {
                    Some((v4, v6)) if d.addresses.is_empty() && d.allocate_vips => {
                        (vec![IpAddr::V4(*v4), IpAddr::V6(*v6)], true)
                    }
                    _ => (d.addresses.clone(), false),
                };
                by_host.insert(host.clone(), services.len());
                services.push((i, host.clone(), vips, auto_allocated));
            }
        }
        let mut by_vip = HashMap::new();
        for (s, (d, host, vips, _)) in services.iter().enumerate() {
            for ip in vips {
                for p in &decls[*d].ports {
                    if let Some(prev) = by_vip.insert((*ip, p.number), s) {
                        tracing::warn!(vip = %ip, port = p.number, first = %services[prev].1, second = %host, "two services claim one address and port; the first keeps it");
                        by_vip.insert((*ip, p.number), prev);
                    }
                }
            }
        }
        let derived_names = Arc::new(NameTable::build(
            services
                .iter()
                .filter(|(d, ..)| !decls[*d].names_given)
                .map(|(_, host, vips, _)| (host, vips.as_slice())),
            &options.namespace,
            &options.cluster_domain,
        ));
        Shape {
            decls,
            networks,
            services,
            by_vip,
            by_host,
            derived_names,
        }
    }

    /// `decls` in origin order.
    fn same_as(&self, decls: &[Arc<ServiceDecl>], networks: &Networks) -> bool {
        self.networks == *networks
            && self.decls.len() == decls.len()
            && self
                .decls
                .iter()
                .zip(decls)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.same_shape(b))
    }
}

impl Table {
    /// A table from one source's resources.
    pub fn build(res: Resources, options: Options) -> Table {
        Self::build_on(res, options, None)
    }

    /// Like `build`, reusing `prev`'s shape (VIPs, indices, names) when the services are the
    /// same but for their endpoints, and `prev`'s services whose endpoints did not change.
    pub fn build_on(res: Resources, options: Options, prev: Option<&Table>) -> Table {
        let prev = prev.filter(|p| p.options == options);
        let traffic = Arc::new(Traffic::build(&res, &options));
        // A stable order makes "first wins" on duplicate hosts independent of file order.
        let mut decls = res.services;
        if !decls.is_sorted_by(|a, b| a.origin <= b.origin) {
            decls.sort_by(|a, b| a.origin.cmp(&b.origin));
        }
        let shape = match prev {
            Some(p) if p.shape.same_as(&decls, &res.networks) => p.shape.clone(),
            _ => Arc::new(Shape::build(decls.clone(), res.networks.clone(), &options)),
        };
        let networks = &shape.networks;
        let workloads: Vec<Arc<Workload>> = res
            .workloads
            .iter()
            .map(|w| with_network(w, networks))
            .collect();
        let index = SelectorIndex::new(&workloads);
        let mut resolved: Vec<Option<Endpoints>> = vec![None; decls.len()];
        let mut services = Vec::with_capacity(shape.services.len());
        let same_shape = prev.filter(|p| Arc::ptr_eq(&p.shape, &shape));
        for (s, (d, host, vips, auto_allocated)) in shape.services.iter().enumerate() {
            let decl = &decls[*d];
            // The very decl of the previous table, with its endpoints inline: the previous
            // service as is, nothing to resolve (an EDS push touches a few of 10 000).
            if let Some(p) = same_shape {
                let same_decl = p.decls.get(*d).is_some_and(|pd| Arc::ptr_eq(pd, decl));
                if let (true, None, Some(old)) = (same_decl, &decl.selector, p.services.get(s)) {
                    services.push(old.clone());
                    continue;
                }
            }
            let (endpoints, port_endpoints) = resolved[*d]
                .get_or_insert_with(|| {
                    // Endpoints given as they are reached keep their (empty) network.
                    let place = |w: &Arc<Workload>| {
                        if decl.endpoints_as_given {
                            w.clone()
                        } else {
                            with_network(w, networks)
                        }
                    };
                    let endpoints = match &decl.selector {
                        Some(sel) => index.select(&decl.namespace, sel),
                        None => decl.endpoints.iter().map(place).collect(),
                    };
                    let by_port = decl
                        .port_endpoints
                        .iter()
                        .map(|(p, ws)| (p, ws.iter().map(place).collect()))
                        .collect();
                    (endpoints, by_port)
                })
                .clone();
            // Same shape and the same endpoint Arcs: the previous service as is.
            if let Some(old) = prev
                .filter(|p| Arc::ptr_eq(&p.shape, &shape))
                .and_then(|p| p.services.get(s))
            {
                if same_arcs(&old.endpoints, &endpoints)
                    && old.subsets == decl.subsets
                    && old.policies == decl.policies
                    && old.port_endpoints.len() == port_endpoints.len()
                    && old
                        .port_endpoints
                        .iter()
                        .zip(port_endpoints.iter())
                        .all(|((pa, a), (pb, b))| pa == pb && same_arcs(a, b))
                {
                    services.push(old.clone());
                    continue;
                }
            }
            services.push(Arc::new(Service {
                host: host.clone(),
                origin: decl.origin.clone(),
                namespace: decl.namespace.clone(),
                vips: vips.clone(),
                auto_allocated: *auto_allocated,
                ports: decl.ports.clone(),
                resolution: decl.resolution,
                location: decl.location,
                subject_alt_names: decl.subject_alt_names.clone(),
                endpoints,
                port_endpoints,
                endpoints_as_given: decl.endpoints_as_given,
                subsets: decl.subsets.clone(),
                policies: decl.policies.clone(),
            }));
        }
        let names = match (&res.names, prev) {
            (None, _) => shape.derived_names.clone(),
            // Nothing derived to add: the source's table as is.
            (Some(given), _) if shape.derived_names.is_empty() => given.clone(),
            // Same source table on the same shape: the same merged names.
            (Some(given), Some(p))
                if Arc::ptr_eq(&p.shape, &shape)
                    && p.provided_names
                        .as_ref()
                        .is_some_and(|q| Arc::ptr_eq(q, given)) =>
            {
                p.names.clone()
            }
            (Some(given), _) => Arc::new(given.overlaid_on(&shape.derived_names)),
        };
        Table {
            version: 0,
            loaded_unix: 0,
            options,
            services,
            workloads,
            groups: res.groups,
            networks: shape.networks.clone(),
            names,
            provided_names: res.names,
            traffic,
            peer_authentications: res.peer_authentications,
            authorization_policies: res.authorization_policies,
            shape,
            decls,
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
        let svc = &self.services[*self.shape.by_vip.get(&(ip, dst.port()))?];
        Some((svc, svc.port(dst.port())?))
    }

    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.shape
            .by_host
            .get(&Host::new(host))
            .map(|i| &self.services[*i])
    }

    /// Every (VIP, port) the kernel must capture.
    pub fn captured(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.shape
            .by_vip
            .keys()
            .map(|(ip, port)| SocketAddr::new(*ip, *port))
    }

    /// Istio's outboundTrafficPolicy in force: REGISTRY_ONLY when istiod's `virtualOutbound`
    /// black-holes what matches no listener, else the flag (ALLOW_ANY by default).
    pub fn registry_only(&self) -> bool {
        match self.traffic.catch_all() {
            Some(l) => l
                .rules
                .iter()
                .any(|r| r.target == super::traffic::Target::BlackHole),
            None => self.options.registry_only,
        }
    }

    /// Does this table share its shape with `other` (an endpoint-only change)?
    pub fn same_shape(&self, other: &Table) -> bool {
        Arc::ptr_eq(&self.shape, &other.shape)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mesh::model::Health;

    pub(crate) fn workload(ns: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: format!("{ns}/{ip}"),
            namespace: ns.into(),
            address: Address::Ip(ip.parse().unwrap()),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ports: BTreeMap::new(),
            port: None,
            network: String::new(),
            locality: String::new(),
            weight: 1,
            service_account: "default".into(),
            health: Health::Healthy,
            priority: 0,
        }
    }

    pub(crate) fn product() -> ServiceDecl {
        ServiceDecl {
            origin: "default/product".into(),
            namespace: "default".into(),
            hosts: vec![Host::new("product.default.svc.cluster.local")],
            allocate_vips: true,
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
            services: vec![Arc::new(product())],
            workloads: vec![
                Arc::new(workload("default", "10.0.0.2", &[("app", "product")])),
                Arc::new(workload("default", "10.0.0.3", &[("app", "other")])),
                Arc::new(workload("other", "10.0.0.4", &[("app", "product")])),
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
            services: vec![Arc::new(product())],
            ..Default::default()
        };
        let t = Table::build(
            res,
            Options {
                namespace: "other".into(),
                cluster_domain: "cluster.local".into(),
                registry_only: false,
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
        wild.endpoints = vec![Arc::new(workload("default", "10.2.0.9", &[]))];
        let res = Resources {
            services: vec![Arc::new(wild)],
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

    #[test]
    fn an_endpoint_change_keeps_the_shape_and_untouched_services() {
        let svc = |name: &str, ip: &str| {
            let mut d = product();
            d.origin = format!("default/{name}");
            d.hosts = vec![Host::new(&format!("{name}.default.svc.cluster.local"))];
            d.selector = None;
            d.endpoints = vec![Arc::new(workload("default", ip, &[]))];
            d
        };
        let (a, b) = (svc("a", "10.0.0.1"), svc("b", "10.0.0.2"));
        let first = Table::build(
            Resources {
                services: vec![Arc::new(a.clone()), Arc::new(b.clone())],
                ..Default::default()
            },
            Options::default(),
        );
        let mut b2 = b.clone();
        b2.endpoints
            .push(Arc::new(workload("default", "10.0.0.3", &[])));
        let second = Table::build_on(
            Resources {
                services: vec![Arc::new(a.clone()), Arc::new(b2)],
                ..Default::default()
            },
            Options::default(),
            Some(&first),
        );
        assert!(second.same_shape(&first));
        assert!(Arc::ptr_eq(&first.names, &second.names));
        let host = |t: &Table, h: &str| t.service_by_host(h).unwrap().clone();
        assert!(Arc::ptr_eq(
            &host(&first, "a.default.svc.cluster.local"),
            &host(&second, "a.default.svc.cluster.local")
        ));
        assert_eq!(
            host(&second, "b.default.svc.cluster.local").endpoints.len(),
            2
        );
        // A new port is a new shape.
        let mut a3 = a;
        a3.ports[0].number = 9999;
        let third = Table::build_on(
            Resources {
                services: vec![Arc::new(a3), Arc::new(b)],
                ..Default::default()
            },
            Options::default(),
            Some(&second),
        );
        assert!(!third.same_shape(&second));
    }
}
