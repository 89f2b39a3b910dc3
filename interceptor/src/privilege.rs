//! Least privilege. Attaching programs, creating maps and binding listeners need capabilities;
//! once `run` has done all that, nothing it does needs them again: maps are written through
//! descriptors it holds, links detach when their descriptors close, every listener is bound,
//! and the files it reads must be readable by root as owner, group or other anyway (the unit
//! grants no DAC override). So it drops every capability from every set, the bounding set
//! included: a compromised daemon cannot regain one, and the commands exec probes run start
//! with none.

use caps::{CapSet, Capability};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dropping capabilities ({set:?}): {source}")]
    Drop {
        set: CapSet,
        source: caps::errors::CapsError,
    },
}

/// Effective capabilities now, as the `CapEff` mask of /proc/self/status.
pub fn effective_mask() -> u64 {
    caps::read(None, CapSet::Effective)
        .map(|set| set.iter().fold(0u64, |m, c| m | c.bitmask()))
        .unwrap_or(0)
}

/// Empties the bounding, ambient, inheritable, effective and permitted sets (in that order: the
/// bounding set needs CAP_SETPCAP, which goes last). A process without CAP_SETPCAP (not root,
/// or a unit that does not grant it) keeps its bounding set: it cannot shrink it.
pub fn drop_all() -> Result<(), Error> {
    let err = |set| move |source| Error::Drop { set, source };
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(err(CapSet::Effective))?
    {
        caps::clear(None, CapSet::Bounding).map_err(err(CapSet::Bounding))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(err(set))?;
    }
    Ok(())
}
