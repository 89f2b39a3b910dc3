//! Least privilege. Attaching programs, creating maps and binding listeners need capabilities;
//! once `run` has done all that, nothing it does needs them again: maps are written through
//! descriptors it holds, links detach when their descriptors close, and every listener is bound.
//! So it drops every capability but one, from every set, the bounding set included: a
//! compromised daemon cannot regain them, and the commands exec probes run start with none.
//!
//! The one kept is CAP_DAC_READ_SEARCH: Istio's VM setup hands the bundle (token, certificates)
//! to the `istio-proxy` user, and the token is re-read on every connection to istiod.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dropping capabilities ({set:?}): {source}")]
    Drop {
        set: CapSet,
        source: caps::errors::CapsError,
    },
}

/// What the daemon keeps after start-up.
pub const KEPT: [Capability; 1] = [Capability::CAP_DAC_READ_SEARCH];

/// Effective capabilities now, as the `CapEff` mask of /proc/self/status.
pub fn effective_mask() -> u64 {
    caps::read(None, CapSet::Effective)
        .map(|set| set.iter().fold(0u64, |m, c| m | c.bitmask()))
        .unwrap_or(0)
}

/// Drops every capability not in `KEPT` from the bounding, ambient, inheritable, effective and
/// permitted sets (in that order: the bounding set needs CAP_SETPCAP, which goes last). A
/// process started without CAP_SETPCAP (not root) cannot shrink its bounding set and has no
/// capability to lose there.
pub fn drop_to_kept() -> Result<(), Error> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    let err = |set| move |source| Error::Drop { set, source };
    let can_bound = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(err(CapSet::Effective))?;
    if can_bound {
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(err(CapSet::Bounding))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err(CapSet::Ambient))?;
    caps::clear(None, CapSet::Inheritable).map_err(err(CapSet::Inheritable))?;
    let held = caps::read(None, CapSet::Permitted).map_err(err(CapSet::Permitted))?;
    let kept: CapsHashSet = held.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(err(CapSet::Effective))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err(CapSet::Permitted))?;
    Ok(())
}
