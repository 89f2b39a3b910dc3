//! The DNS name table (Istio's NDS): which names answer with which addresses. Part of the mesh
//! model because istiod computes it, so an xDS source will write it directly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::Serialize;

use super::model::Host;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NameEntry {
    /// The service host the name belongs to (the CNAME target for search-domain names).
    pub host: Host,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NameTable {
    /// Every name variant of a service shares one entry.
    exact: HashMap<String, Arc<NameEntry>>,
    wildcards: Vec<(Host, Arc<NameEntry>)>,
}

impl NameTable {
    /// Builds the table of (host, VIPs) pairs with Istio's name variants (SPEC section 4).
    pub fn build<'a>(
        services: impl IntoIterator<Item = (&'a Host, &'a [IpAddr])>,
        namespace: &str,
        cluster_domain: &str,
    ) -> Self {
        let mut table = NameTable::default();
        for (host, vips) in services {
            if vips.is_empty() {
                continue;
            }
            let mut names = vec![host.as_str().to_string()];
            if let Some((name, ns)) = host.kubernetes_name(cluster_domain) {
                names.push(format!("{name}.{ns}"));
                names.push(format!("{name}.{ns}.svc"));
                if ns == namespace {
                    names.push(name.to_string());
                }
            }
            table.insert(host, vips, names);
        }
        table
    }

    /// Adds `host` answering with `ips` under each of `names` (the first holder of a name keeps
    /// it: callers go in a stable order). A wildcard host is matched by suffix instead.
    pub fn insert(&mut self, host: &Host, ips: &[IpAddr], names: Vec<String>) {
        let mut entry = NameEntry {
            host: host.clone(),
            ..Default::default()
        };
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => entry.v4.push(*v4),
                IpAddr::V6(v6) => entry.v6.push(*v6),
            }
        }
        let entry = Arc::new(entry);
        if host.is_wildcard() {
            // Most specific wildcard first.
            let at = self
                .wildcards
                .iter()
                .position(|(h, _)| h.as_str().len() < host.as_str().len())
                .unwrap_or(self.wildcards.len());
            self.wildcards.insert(at, (host.clone(), entry));
            return;
        }
        for n in names {
            self.exact.entry(n).or_insert_with(|| entry.clone());
        }
    }

    /// This table, with `under`'s names that this one does not have: a source's own table
    /// (istiod's) first, the names of services only other sources know after it.
    pub fn overlaid_on(&self, under: &NameTable) -> NameTable {
        let mut out = self.clone();
        for (name, entry) in &under.exact {
            out.exact
                .entry(name.clone())
                .or_insert_with(|| entry.clone());
        }
        for (host, entry) in &under.wildcards {
            if !out.wildcards.iter().any(|(h, _)| h == host) {
                out.wildcards.push((host.clone(), entry.clone()));
            }
        }
        out.wildcards
            .sort_by_key(|(h, _)| std::cmp::Reverse(h.as_str().len()));
        out
    }

    /// `name`: lower case, no trailing dot.
    pub fn lookup(&self, name: &str) -> Option<&NameEntry> {
        self.exact
            .get(name)
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(h, _)| h.matches(name))
                    .map(|(_, e)| e)
            })
            .map(Arc::as_ref)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every exact name (for `/config_dump` and `check`).
    pub fn names(&self) -> impl Iterator<Item = (&str, &NameEntry)> {
        self.exact
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .chain(self.wildcards.iter().map(|(h, e)| (h.as_str(), e.as_ref())))
    }
}
