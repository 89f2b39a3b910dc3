//! The last table accepted from istiod, on disk: written atomically (a temporary file, synced,
//! renamed over the old one), read at start.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::Accepted;

/// Bumped when the layout changes: an older file is ignored, never misread.
const FORMAT: u32 = 1;

#[derive(Deserialize)]
struct File {
    format: u32,
    accepted: Accepted,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", file.display())]
    Io {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    Format {
        file: std::path::PathBuf,
        source: serde_json::Error,
    },
}

pub fn load(path: &Path) -> Result<Option<Accepted>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                file: path.to_path_buf(),
                source,
            })
        }
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|source| Error::Format {
        file: path.to_path_buf(),
        source,
    })?;
    Ok((file.format == FORMAT).then_some(file.accepted))
}

#[derive(Serialize)]
struct FileRef<'a> {
    format: u32,
    accepted: &'a Accepted,
}

/// The file's bytes for `accepted`.
pub fn encode(accepted: &Accepted) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&FileRef {
        format: FORMAT,
        accepted,
    })
    .map_err(|source| Error::Format {
        file: Default::default(),
        source,
    })
}

pub fn save(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        file: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
