//! The maps every generation of the daemon shares: where connect() and sockops record a captured
//! connection's original destination. A restarted or reloaded process loads its programs onto
//! the previous process's maps (aya finds them pinned in bpffs for the time of the load), so an
//! entry written by either generation's programs is found by whichever process accepts the
//! connection: during a reload both accept at once.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use aya::maps::MapData;
use aya::EbpfLoader;
use interceptor_ebpf::maps;

use crate::fdstore::FdStore;

/// The maps shared across generations.
pub const SHARED: [&str; 2] = [maps::COOKIE_ORIG, maps::ORIG_BY_PEER];

/// A shared map's name in systemd's store.
pub fn stored(name: &str) -> String {
    format!("map.{name}")
}

/// The previous process's shared maps, pinned where the loader looks for them until dropped.
pub struct Pins {
    dir: PathBuf,
    pinned: Vec<(&'static str, PathBuf)>,
    /// The previous original-destination map when it could not be shared (no bpffs): read as a
    /// fallback.
    pub previous_orig: Option<MapData>,
}

impl Pins {
    pub fn of_previous(store: &mut FdStore) -> Self {
        let dir = PathBuf::from("/sys/fs/bpf").join(format!("interceptor-{}", std::process::id()));
        let mut pins = Pins {
            dir,
            pinned: Vec::new(),
            previous_orig: None,
        };
        for name in SHARED {
            let key = stored(name);
            let Some(fd) = store.take(&key) else {
                continue;
            };
            if let Err(e) = pins.pin(name, fd) {
                tracing::warn!(map = name, error = %e, "cannot share the previous process's map (is bpffs mounted on /sys/fs/bpf?)");
                store.reject(&key);
            }
        }
        pins
    }

    /// Pins the previous process's map `name`; where that fails, its original-destination map is
    /// kept as `previous_orig`.
    fn pin(&mut self, name: &'static str, fd: OwnedFd) -> Result<(), String> {
        let data = MapData::from_fd(fd).map_err(|e| e.to_string())?;
        let path = self.dir.join(name);
        let pinned = std::fs::create_dir_all(&self.dir)
            .map_err(|e| e.to_string())
            .and_then(|()| data.pin(&path).map_err(|e| e.to_string()));
        match pinned {
            Ok(()) => {
                self.pinned.push((name, path));
                Ok(())
            }
            Err(e) => {
                if name == maps::ORIG_BY_PEER {
                    self.previous_orig = Some(data);
                }
                Err(e)
            }
        }
    }

    /// Points the loader at the pinned maps.
    pub fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for (name, path) in &self.pinned {
            loader.map_pin_path(name, path.clone());
        }
    }

    pub fn shared(&self) -> usize {
        self.pinned.len()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        // The pins only lived for the load: the maps stay, held by the programs and the store.
        for (_, path) in &self.pinned {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Stores this process's shared maps for the next one (a map it shares is already there).
pub fn store_shared(ebpf: &aya::Ebpf, store: &mut FdStore) -> Result<(), crate::fdstore::Error> {
    for name in SHARED {
        let data = match ebpf.map(name) {
            Some(aya::maps::Map::LruHashMap(d)) | Some(aya::maps::Map::HashMap(d)) => d,
            _ => continue,
        };
        store.put(&stored(name), data.fd().as_fd(), false)?;
    }
    Ok(())
}
