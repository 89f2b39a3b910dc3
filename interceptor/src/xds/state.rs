//! The resources istiod sent and we accepted, by type, and the mesh view made of them. Only what
//! a push touched is remade: a cluster's workloads when its endpoints change, a host's service
//! when its clusters or name change, so one endpoint change on a 10 000-service mesh costs one
//! service, not ten thousand.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::listeners::Decoded;
use super::resources::{
    build_names, cluster_workloads, service, ClusterInfo, ClusterKind, EndpointInfo, NameInfo,
};
use crate::mesh::http_route::VirtualHostRoutes;
use crate::mesh::inbound::InboundIntent;
use crate::mesh::traffic::ListenerRoute;
use crate::mesh::{NameTable, Resources, ServiceDecl, Workload};

/// What is kept across restarts (the persisted table).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Accepted {
    pub clusters: HashMap<String, ClusterInfo>,
    pub assignments: HashMap<String, Vec<EndpointInfo>>,
    pub names: BTreeMap<String, NameInfo>,
    /// The TCP routes of istiod's listeners, by listener name (only those that say more than
    /// "the service itself").
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerRoute>,
    /// `virtualInbound`: the inbound mTLS modes and authorization istiod computed for us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundIntent>,
    /// The RDS name each HTTP listener takes, by listener name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rds: BTreeMap<String, String>,
    /// RDS: by route configuration name, the virtual hosts a VirtualService made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub http_routes: BTreeMap<String, Vec<VirtualHostRoutes>>,
}

#[derive(Default)]
pub struct State {
    accepted: Accepted,
    namespace: String,
    cluster_domain: String,
    /// Derived, kept between pushes.
    /// A host's clusters (one a port: a short list, sorted).
    by_host: HashMap<String, Vec<String>>,
    workloads: HashMap<String, Vec<Arc<Workload>>>,
    /// By host: sorted, as the table wants its services.
    decls: BTreeMap<String, Arc<ServiceDecl>>,
    name_table: Option<Arc<NameTable>>,
    /// The listener routes in force (remade when LDS changes them).
    routes: Vec<Arc<ListenerRoute>>,
    http_hosts: Vec<Arc<VirtualHostRoutes>>,
    inbound: Option<Arc<InboundIntent>>,
    routes_dirty: bool,
    dirty_clusters: HashSet<String>,
    dirty_hosts: HashSet<String>,
    names_dirty: bool,
}

impl State {
    pub fn new(namespace: &str, cluster_domain: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            cluster_domain: cluster_domain.to_string(),
            ..Default::default()
        }
    }

    pub fn restore(mut self, accepted: Accepted) -> Self {
        self.dirty_clusters = accepted.clusters.keys().cloned().collect();
        self.dirty_hosts = accepted.clusters.values().map(|c| c.host.clone()).collect();
        for c in accepted.clusters.values() {
            add_sorted(self.by_host.entry(c.host.clone()).or_default(), &c.name);
        }
        self.names_dirty = true;
        self.routes_dirty = true;
        self.accepted = accepted;
        self
    }

    /// A delta of LDS: listeners added or changed (None: no route of ours in it any more), and
    /// removed by name.
    pub fn update_listeners(&mut self, changed: Vec<Decoded>, removed: &[String]) {
        for name in removed {
            self.accepted.rds.remove(name);
            self.routes_dirty |= self.accepted.listeners.remove(name).is_some();
            if name == super::inbound::VIRTUAL_INBOUND {
                self.routes_dirty |= self.accepted.inbound.take().is_some();
            }
        }
        for Decoded {
            name,
            route,
            inbound,
            rds,
        } in changed
        {
            match rds {
                Some(r) => self.accepted.rds.insert(name.clone(), r),
                None => self.accepted.rds.remove(&name),
            };
            if name == super::inbound::VIRTUAL_INBOUND {
                self.routes_dirty |= self.accepted.inbound != inbound;
                self.accepted.inbound = inbound;
                continue;
            }
            let before = match route {
                Some(r) => {
                    let same = self.accepted.listeners.get(&name) == Some(&r);
                    self.accepted.listeners.insert(name, r);
                    same
                }
                None => self.accepted.listeners.remove(&name).is_none(),
            };
            self.routes_dirty |= !before;
        }
    }

    /// The whole LDS (SotW): what is not in it is gone.
    pub fn replace_listeners(&mut self, all: Vec<Decoded>) {
        let mut inbound = None;
        let mut now = BTreeMap::new();
        self.accepted.rds.clear();
        for d in all {
            if let Some(r) = d.rds {
                self.accepted.rds.insert(d.name.clone(), r);
            }
            if d.inbound.is_some() {
                inbound = d.inbound;
            } else if let Some(r) = d.route {
                now.insert(d.name, r);
            }
        }
        if now != self.accepted.listeners || inbound != self.accepted.inbound {
            self.accepted.listeners = now;
            self.accepted.inbound = inbound;
            self.routes_dirty = true;
        }
    }

    /// The route configurations the HTTP listeners take (RDS subscriptions).
    pub fn rds_names(&self) -> BTreeSet<String> {
        self.accepted.rds.values().cloned().collect()
    }

    /// A delta of RDS.
    pub fn update_routes(
        &mut self,
        changed: Vec<(String, Vec<VirtualHostRoutes>)>,
        removed: &[String],
    ) {
        for name in removed {
            self.routes_dirty |= self.accepted.http_routes.remove(name).is_some();
        }
        for (name, hosts) in changed {
            if self.accepted.http_routes.get(&name) != Some(&hosts) {
                self.accepted.http_routes.insert(name, hosts);
                self.routes_dirty = true;
            }
        }
    }

    /// The whole RDS (SotW): what is not in it is gone.
    pub fn replace_routes(&mut self, all: Vec<(String, Vec<VirtualHostRoutes>)>) {
        let now: BTreeMap<_, _> = all.into_iter().collect();
        if now != self.accepted.http_routes {
            self.accepted.http_routes = now;
            self.routes_dirty = true;
        }
    }

    pub fn accepted(&self) -> &Accepted {
        &self.accepted
    }

    pub fn clusters(&self) -> usize {
        self.accepted.clusters.len()
    }

    fn touch_cluster(&mut self, name: &str) {
        self.dirty_clusters.insert(name.to_string());
        if let Some(c) = self.accepted.clusters.get(name) {
            self.dirty_hosts.insert(c.host.clone());
        }
    }

    /// A delta of CDS: clusters added or changed, and removed by name.
    pub fn update_clusters(&mut self, changed: Vec<ClusterInfo>, removed: &[String]) {
        for name in removed {
            self.touch_cluster(name);
            if let Some(c) = self.accepted.clusters.remove(name) {
                if let Some(set) = self.by_host.get_mut(&c.host) {
                    set.retain(|n| n != name);
                }
            }
            // A cluster's endpoints go with it.
            self.accepted.assignments.remove(name);
        }
        for c in changed {
            let name = c.name.clone();
            // A cluster whose host changed leaves its old host.
            self.touch_cluster(&name);
            if let Some(old) = self.accepted.clusters.get(&name) {
                if let Some(set) = self.by_host.get_mut(&old.host) {
                    set.retain(|n| *n != name);
                }
            }
            self.dirty_hosts.insert(c.host.clone());
            add_sorted(self.by_host.entry(c.host.clone()).or_default(), &name);
            self.accepted.clusters.insert(name, c);
        }
    }

    /// The whole CDS (SotW): what is not in it is gone.
    pub fn replace_clusters(&mut self, all: Vec<ClusterInfo>) {
        let keep: HashSet<&str> = all.iter().map(|c| c.name.as_str()).collect();
        let gone: Vec<String> = self
            .accepted
            .clusters
            .keys()
            .filter(|k| !keep.contains(k.as_str()))
            .cloned()
            .collect();
        let changed: Vec<ClusterInfo> = all
            .into_iter()
            .filter(|c| self.accepted.clusters.get(&c.name) != Some(c))
            .collect();
        self.update_clusters(changed, &gone);
    }

    /// Load assignments (EDS, delta or SotW alike: SotW EDS may be partial, so only what is
    /// sent changes), and removed ones by name.
    pub fn update_assignments(
        &mut self,
        changed: Vec<(String, Vec<EndpointInfo>)>,
        removed: &[String],
    ) {
        for name in removed {
            self.accepted.assignments.remove(name);
            self.touch_cluster(name);
        }
        for (name, eps) in changed {
            if self.accepted.assignments.get(&name) == Some(&eps) {
                continue;
            }
            self.accepted.assignments.insert(name.clone(), eps);
            self.touch_cluster(&name);
        }
    }

    pub fn replace_names(&mut self, names: BTreeMap<String, NameInfo>) {
        if names == self.accepted.names {
            return;
        }
        // A name's addresses are its service's VIPs.
        for (host, info) in &names {
            if self.accepted.names.get(host) != Some(info) {
                self.dirty_hosts.insert(host.clone());
            }
        }
        for host in self.accepted.names.keys() {
            if !names.contains_key(host) {
                self.dirty_hosts.insert(host.clone());
            }
        }
        self.accepted.names = names;
        self.names_dirty = true;
    }

    /// The EDS clusters: the names to subscribe to.
    pub fn eds_clusters(&self) -> BTreeSet<String> {
        self.accepted
            .clusters
            .values()
            .filter(|c| c.kind == ClusterKind::Eds)
            .map(|c| c.name.clone())
            .collect()
    }

    /// EDS clusters with no load assignment yet: warming, left out of the table until it comes.
    fn warming(&self, c: &ClusterInfo) -> bool {
        c.kind == ClusterKind::Eds && !self.accepted.assignments.contains_key(&c.name)
    }

    /// The mesh view of everything accepted.
    pub fn resources(&mut self) -> Resources {
        for name in std::mem::take(&mut self.dirty_clusters) {
            match self.accepted.clusters.get(&name) {
                Some(c) => {
                    let w = cluster_workloads(
                        c,
                        self.accepted.assignments.get(&name).map(Vec::as_slice),
                    );
                    self.workloads.insert(name, w);
                }
                None => {
                    self.workloads.remove(&name);
                }
            }
        }
        if std::mem::take(&mut self.names_dirty) {
            self.name_table = Some(Arc::new(build_names(
                &self.accepted.names,
                &self.namespace,
                &self.cluster_domain,
            )));
        }
        for host in std::mem::take(&mut self.dirty_hosts) {
            let clusters: Vec<&ClusterInfo> = self
                .by_host
                .get(&host)
                .into_iter()
                .flatten()
                .filter_map(|name| self.accepted.clusters.get(name))
                .filter(|c| !self.warming(c))
                .collect();
            if clusters.is_empty() {
                drop(clusters);
                self.decls.remove(&host);
                if self.by_host.get(&host).is_some_and(Vec::is_empty) {
                    self.by_host.remove(&host);
                }
                continue;
            }
            let decl = service(
                &host,
                &clusters,
                |c| self.workloads.get(&c.name).cloned().unwrap_or_default(),
                &self.accepted.names,
            );
            self.decls.insert(host, Arc::new(decl));
        }
        if std::mem::take(&mut self.routes_dirty) {
            let registry_only = self
                .accepted
                .listeners
                .get(super::listeners::VIRTUAL_OUTBOUND)
                .is_some_and(|l| {
                    l.rules
                        .iter()
                        .any(|r| r.target == crate::mesh::traffic::Target::BlackHole)
                });
            if registry_only {
                tracing::info!("istiod sets outboundTrafficPolicy REGISTRY_ONLY");
            }
            self.routes = self
                .accepted
                .listeners
                .values()
                .cloned()
                .map(Arc::new)
                .collect();
            self.inbound = self.accepted.inbound.clone().map(Arc::new);
            self.http_hosts = self
                .accepted
                .http_routes
                .values()
                .flatten()
                .cloned()
                .map(Arc::new)
                .collect();
        }
        Resources {
            services: self.decls.values().cloned().collect(),
            names: self.name_table.clone(),
            listener_routes: self.routes.clone(),
            http_hosts: self.http_hosts.clone(),
            inbound: self.inbound.clone(),
            ..Default::default()
        }
    }
}

fn add_sorted(names: &mut Vec<String>, name: &str) {
    if let Err(i) = names.binary_search_by(|n| n.as_str().cmp(name)) {
        names.insert(i, name.to_string());
    }
}
