//! The file source: Istio YAML files and directories on the VM, watched and re-read whole on
//! change. A bad edit is reported and the view in force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::istio::parse_documents;
use super::networks::Networks;
use super::table::Resources;
use super::{Error, SourceId, Store};
use crate::watch::FileWatch;

/// Let a burst of writes settle so a half-written file is not read.
const SETTLE: Duration = Duration::from_millis(150);

#[derive(Clone, Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    mesh_networks: Option<PathBuf>,
    /// Namespace of documents that name none.
    namespace: String,
}

fn is_mesh_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>, mesh_networks: Option<PathBuf>, namespace: String) -> Self {
        Self {
            paths,
            mesh_networks,
            namespace,
        }
    }

    /// The files the paths stand for: files as given, directories' *.yaml|*.yml|*.json sorted.
    fn files(&self, errors: &mut Vec<Error>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for p in &self.paths {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => match std::fs::read_dir(p) {
                    Ok(rd) => {
                        let mut files: Vec<PathBuf> = rd
                            .filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| is_mesh_file(p) && p.is_file())
                            .collect();
                        files.sort();
                        out.extend(files);
                    }
                    Err(source) => errors.push(Error::Read {
                        file: p.clone(),
                        source,
                    }),
                },
                Ok(_) => out.push(p.clone()),
                Err(source) => errors.push(Error::Read {
                    file: p.clone(),
                    source,
                }),
            }
        }
        out
    }

    /// Reads everything; any error fails the whole load.
    pub fn load(&self) -> Result<Resources, Vec<Error>> {
        let mut errors = Vec::new();
        let mut res = Resources::default();
        for file in self.files(&mut errors) {
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_documents(&file, &text, &self.namespace, &mut res, &mut errors),
                Err(source) => errors.push(Error::Read { file, source }),
            }
        }
        if let Some(file) = &self.mesh_networks {
            match std::fs::read_to_string(file) {
                Ok(text) => match Networks::from_yaml(&text) {
                    Ok(n) => res.networks = n,
                    Err(source) => errors.push(Error::Networks {
                        file: file.clone(),
                        source,
                    }),
                },
                Err(source) => errors.push(Error::Read {
                    file: file.clone(),
                    source,
                }),
            }
        }
        release_freed_memory();
        if errors.is_empty() {
            Ok(res)
        } else {
            Err(errors)
        }
    }

    /// Loads into `store`, or reports why not (the view in force stays).
    pub fn load_into(&self, store: &Store) -> Result<u64, Vec<Error>> {
        match self.load() {
            Ok(res) => {
                let (services, workloads) = (res.services.len(), res.workloads.len());
                let version = store.publish(SourceId::Files, res);
                tracing::info!(version, services, workloads, "mesh files loaded");
                Ok(version)
            }
            Err(errors) => {
                if let Some(first) = errors.first() {
                    store.record_reload_error(SourceId::Files, first.reason(), first.to_string());
                }
                for e in &errors {
                    tracing::error!(error = %e, "mesh files rejected");
                }
                Err(errors)
            }
        }
    }

    /// Starts watching now (so no change after this call is missed); the returned future
    /// reloads into `store` on every change, until dropped.
    pub fn watch(
        self,
        store: Arc<Store>,
    ) -> notify::Result<impl std::future::Future<Output = ()> + Send> {
        let mut watched: Vec<PathBuf> = self.paths.clone();
        watched.extend(self.mesh_networks.clone());
        let interesting = watched.clone();
        let relevant = move |p: &Path| {
            interesting
                .iter()
                .any(|w| p == w || (p.parent() == Some(w.as_path()) && is_mesh_file(p)))
        };
        let mut changes = FileWatch::new(&watched, relevant, SETTLE)?;
        Ok(async move {
            while changes.changed().await.is_some() {
                if self.load_into(&store).is_err() {
                    tracing::warn!(
                        version = store.load().version,
                        "keeping the mesh table in force"
                    );
                }
            }
        })
    }
}

/// Parsing thousands of documents (or decoding a big xDS push) leaves freed heap the allocator
/// keeps; hand it back so the daemon's resident size is the table's, not the parser's
/// high-water mark.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: 80}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n";

    #[test]
    fn directory_is_read_and_errors_fail_the_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SE).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let src = FileSource::new(vec![dir.path().into()], None, "default".into());
        assert_eq!(src.load().unwrap().services.len(), 1);
        std::fs::write(
            dir.path().join("b.yaml"),
            SE.replace("number: 80", "number: x"),
        )
        .unwrap();
        let errors = src.load().unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .contains("b.yaml: document 1: spec.ports[0].number"),
            "{}",
            errors[0]
        );
    }

    #[tokio::test]
    async fn hot_reload_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, SE).unwrap();
        let src = FileSource::new(vec![file.clone()], None, "default".into());
        let store = Store::new(Default::default());
        src.load_into(&store).unwrap();
        let mut changed = store.subscribe();
        let _task = tokio::spawn(src.watch(store.clone()).unwrap());

        std::fs::write(&file, SE.replace("a.example.com", "b.example.com")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changed.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(store.load().service_by_host("b.example.com").is_some());

        std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {hosts: []}\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.reload_errors() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.reload_errors(), 1);
        assert!(store.load().service_by_host("b.example.com").is_some());
    }
}
