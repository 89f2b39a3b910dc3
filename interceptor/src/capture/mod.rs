//! The kernel side at run time: load the capture object with aya, attach it to the cgroup, keep
//! its VIP map equal to the mesh table. Dropping `Capture` detaches everything; the links are
//! owned by this process, so they also go when it dies (fail-open).

mod cgroup;
mod kernel;
mod link;
mod orig_dst;
mod shared;

pub use cgroup::{cgroup2_mount, resolve as resolve_cgroup};
pub use orig_dst::OriginalDst;

use std::collections::HashSet;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::maps::{SockHash, SockMap};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use interceptor_ebpf::abi::{
    CidrKey, InboundPort, IpPort, INBOUND_CAPTURE, INBOUND_EXCLUDE, OUTBOUND_ALLOW_ANY,
    OUTBOUND_REGISTRY_ONLY,
};
use interceptor_ebpf::{globals, maps, programs};

use crate::config::{InboundPorts, Ports};
use crate::fdstore::FdStore;
use crate::mesh::Table;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("capture needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root")]
    NotRoot,
    #[error("no cgroup v2 hierarchy: {0}")]
    NoCgroup2(String),
    #[error("cgroup {0} does not exist")]
    CgroupMissing(PathBuf),
    #[error("{path} is not a cgroup v2 directory (the cgroup2 mount is {mount})")]
    NotACgroup { path: PathBuf, mount: PathBuf },
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the BPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("BPF program {program} failed to load: {message}")]
    Program {
        program: &'static str,
        message: String,
    },
    #[error(
        "{source}; this kernel is Linux {release}, capture is tested on {} and newer \
             (Debian 11, 12 and 13 guests: `cargo xtask vm-test`)",
        kernel::MIN_TESTED
    )]
    OlderKernel {
        release: String,
        #[source]
        source: Box<Error>,
    },
    #[error("BPF map {0} missing from the object")]
    MapMissing(&'static str),
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the link of {program}: {source}")]
    Link {
        program: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::fdstore::Error),
}

fn program_error(program: &'static str, e: ProgramError) -> Error {
    let message = match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("{io_error}\nverifier log:\n{verifier_log}"),
        other => {
            let mut msg = other.to_string();
            let mut src = std::error::Error::source(&other);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        }
    };
    Error::Program { program, message }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub cgroup: PathBuf,
    pub ports: Ports,
    /// Inbound capture (sk_lookup in this process's network namespace), if any.
    pub inbound: Option<InboundPorts>,
    /// A cgroup (by id) whose sockets are left alone: where exec probes run. 0: none.
    pub exempt_cgroup: u64,
    /// sockops + sk_msg on the app <-> outbound hop (`--local-hop sockmap`).
    pub local_hop: bool,
    /// Destinations REGISTRY_ONLY never refuses (`--exclude-outbound-cidrs`).
    pub passthrough: Vec<crate::mesh::Cidr>,
}

/// What capture attached, for status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Info {
    pub cgroup: Option<PathBuf>,
    pub programs: Vec<String>,
    pub inbound_ports: Vec<u16>,
    pub inbound_all: bool,
    /// Links taken over from the previous process and running this one's programs.
    #[serde(default)]
    pub adopted_links: usize,
}

/// Capture's state as the admin endpoint reads it: written at attach and on every sync.
#[derive(Default)]
pub struct Status {
    info: Mutex<Option<Info>>,
    vips: AtomicUsize,
}

impl Status {
    pub fn set(&self, info: Info) {
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// None until capture is attached (or decided against).
    pub fn info(&self) -> Option<Info> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_vips(&self, n: usize) {
        self.vips.store(n, Ordering::Relaxed);
    }

    /// Entries in the kernel's VIP map after the last sync.
    pub fn vips(&self) -> usize {
        self.vips.load(Ordering::Relaxed)
    }
}

/// Program `name` of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Program {
            program: name,
            message: "missing from object".into(),
        })?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// The attached capture programs. Holds the links; drop to detach.
pub struct Capture {
    _ebpf: Ebpf,
    /// Our descriptor of each link (aya's own goes with `_ebpf`): what systemd's store keeps.
    _links: Vec<OwnedFd>,
    cgroup: PathBuf,
    attached: Vec<&'static str>,
    /// Links taken over from the previous process, now running this process's programs.
    adopted: usize,
    /// systemd's store keeps the links too: dropping ours detaches nothing.
    kept: bool,
}

impl Capture {
    /// Loads and attaches every program to the cgroup. Returns the capture, the VIP map writer and
    /// the original-destination reader.
    /// `inbound_listeners`: the proxy::Inbound listener sockets (IPv4 first) sk_lookup steers to.
    /// A link the previous process left in `store` is kept and swapped to this process's
    /// program, so capture never stops across a restart. `prepare` fills the VIP map and the
    /// outbound mode before any program is linked: a program swapped into a running link must
    /// never see them empty (an app's connect() to a VIP would go unredirected).
    pub fn attach(
        settings: &Settings,
        inbound_listeners: &[RawFd],
        store: &mut FdStore,
        prepare: impl FnOnce(&mut Vips) -> Result<(), Error>,
    ) -> Result<(Self, Vips, OriginalDst), Error> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::NotRoot);
        }
        // Whatever failed, nothing stays attached (the links drop with `ebpf`); on a kernel
        // older than any measured, the message says so.
        Self::load_and_attach(settings, inbound_listeners, store, prepare).map_err(kernel::explain)
    }

    fn load_and_attach(
        settings: &Settings,
        inbound_listeners: &[RawFd],
        store: &mut FdStore,
        prepare: impl FnOnce(&mut Vips) -> Result<(), Error>,
    ) -> Result<(Self, Vips, OriginalDst), Error> {
        let cgroup = File::open(&settings.cgroup).map_err(|source| Error::OpenCgroup {
            path: settings.cgroup.clone(),
            source,
        })?;
        let pins = shared::Pins::of_previous(store);
        let mut ebpf = load(settings, &pins)?;
        shared::store_shared(&ebpf, store)?;
        // aya loads programs with the descriptors of the maps the object holds: loaded before
        // any map is taken out of it.
        load_programs(&mut ebpf, settings)?;
        // Every map a program reads is filled before any program runs.
        if let Some(inbound) = &settings.inbound {
            fill_inbound(&mut ebpf, inbound, inbound_listeners)?;
        }
        let mut vips = Vips {
            map: take_hash::<IpPort, u32>(&mut ebpf, maps::VIPS)?,
            current: HashSet::new(),
            outbound: OutboundMode::take(&mut ebpf, &settings.passthrough)?,
        };
        prepare(&mut vips)?;
        let orig = take_hash::<IpPort, IpPort>(&mut ebpf, maps::ORIG_BY_PEER)?;

        let mut links = Links {
            store,
            fds: Vec::new(),
            attached: Vec::new(),
            adopted: 0,
        };
        link_all(&mut ebpf, settings, &cgroup, &mut links)?;
        let Links {
            store,
            fds,
            attached,
            adopted,
        } = links;
        let shared = pins.shared();
        let previous = previous_orig(&mut { pins });
        let kept = store.enabled();
        tracing::info!(
            cgroup = %settings.cgroup.display(), programs = ?attached, adopted, shared_maps = shared,
            "capture attached"
        );
        Ok((
            Self {
                _ebpf: ebpf,
                _links: fds,
                cgroup: settings.cgroup.clone(),
                attached,
                adopted,
                kept,
            },
            vips,
            OriginalDst::from_maps(orig, previous),
        ))
    }

    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    pub fn programs(&self) -> &[&'static str] {
        &self.attached
    }

    /// What is attached, for status.
    pub fn info(&self, inbound: Option<&InboundPorts>) -> Info {
        Info {
            cgroup: Some(self.cgroup.clone()),
            programs: self.attached.iter().map(|p| p.to_string()).collect(),
            inbound_ports: inbound.map(|i| i.ports.clone()).unwrap_or_default(),
            inbound_all: inbound.is_some_and(|i| i.all),
            adopted_links: self.adopted,
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.kept {
            tracing::info!(cgroup = %self.cgroup.display(), "capture stays attached: systemd keeps the links for the next process, or detaches them if the unit stops");
        } else {
            tracing::info!(cgroup = %self.cgroup.display(), "capture detached");
        }
    }
}

/// The previous process's original-destination map when it could not be shared: connections
/// its programs captured while no process was accepting are found there.
fn previous_orig(pins: &mut shared::Pins) -> Option<HashMap<MapData, IpPort, IpPort>> {
    let data = pins.previous_orig.take()?;
    let map = aya::maps::Map::from_map_data(data).and_then(HashMap::try_from);
    match map {
        Ok(map) => Some(map),
        Err(e) => {
            tracing::warn!(error = %e, "the previous process's original destinations are unreadable");
            None
        }
    }
}

/// The links of this attach: each program goes into the link the previous process left in the
/// store under its name (BPF_LINK_UPDATE), or into a new one that is stored for the next.
struct Links<'a> {
    store: &'a mut FdStore,
    fds: Vec<OwnedFd>,
    attached: Vec<&'static str>,
    adopted: usize,
}

impl Links<'_> {
    fn link(
        &mut self,
        name: &'static str,
        prog: BorrowedFd<'_>,
        attach: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(), Error> {
        let key = format!("link.{name}");
        if let Some(fd) = self.store.take(&key) {
            match link::update(fd.as_fd(), prog) {
                Ok(()) => {
                    self.fds.push(fd);
                    self.attached.push(name);
                    self.adopted += 1;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(program = name, error = %e, "cannot take over the previous link: attaching a new one");
                    self.store.reject(&key);
                }
            }
        }
        attach()?;
        let id = link::prog_id(prog).map_err(|source| Error::Link {
            program: name,
            source,
        })?;
        let fd = link::find(id).map_err(|source| Error::Link {
            program: name,
            source,
        })?;
        self.store.put(&key, fd.as_fd(), false)?;
        self.fds.push(fd);
        self.attached.push(name);
        Ok(())
    }
}

/// Our own copy of a loaded program's descriptor (aya's is borrowed from the program, which
/// attaching needs mutably).
fn prog_fd(
    fd: Result<&aya::programs::ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<OwnedFd, Error> {
    fd.map_err(|e| program_error(name, e))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Link {
            program: name,
            source,
        })
}

/// The sk_msg program on the local_hops sockhash. The link lives as long as the object.
fn attach_local_hop(ebpf: &mut Ebpf) -> Result<(), Error> {
    let fd = {
        let map = ebpf
            .map(maps::LOCAL_HOPS)
            .ok_or(Error::MapMissing(maps::LOCAL_HOPS))?;
        // The key is kernel-only (struct local_hop_key, two ip_port): userspace only needs the
        // map's descriptor.
        let hash = SockHash::<_, [u8; 40]>::try_from(map).map_err(map_error(maps::LOCAL_HOPS))?;
        hash.fd().try_clone().map_err(|e| Error::Program {
            program: programs::LOCAL_HOP,
            message: format!("map descriptor: {e}"),
        })?
    };
    let name = programs::LOCAL_HOP;
    let prog: &mut SkMsg = program(ebpf, name)?;
    prog.attach(&fd).map_err(|e| program_error(name, e))?;
    Ok(())
}

/// A borrowed descriptor for aya's SockMap::set, which wants something AsRawFd.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The capture object with this process's globals, its maps created, no program loaded.
fn load(settings: &Settings, pins: &shared::Pins) -> Result<Ebpf, Error> {
    let tgid = std::process::id();
    let mut loader = EbpfLoader::new();
    pins.apply(&mut loader);
    Ok(loader
        .override_global(globals::DAEMON_TGID, &tgid, true)
        .override_global(globals::OUTBOUND_PORT, &settings.ports.outbound, true)
        .override_global(globals::DNS_PORT, &settings.ports.dns, true)
        .override_global(globals::INBOUND_PORT, &settings.ports.inbound, true)
        .override_global(globals::EXEMPT_CGROUP, &settings.exempt_cgroup, true)
        .override_global(globals::LOCAL_HOP, &u8::from(settings.local_hop), true)
        .override_global(
            globals::INBOUND_ALL_PORTS,
            &u8::from(settings.inbound.as_ref().is_some_and(|i| i.all)),
            true,
        )
        .load(interceptor_ebpf::capture_object())?)
}

/// Loads every program this configuration runs.
fn load_programs(ebpf: &mut Ebpf, settings: &Settings) -> Result<(), Error> {
    if settings.local_hop {
        let prog: &mut SkMsg = program(ebpf, programs::LOCAL_HOP)?;
        prog.load()
            .map_err(|e| program_error(programs::LOCAL_HOP, e))?;
    }
    for name in programs::SOCK_ADDR {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(|e| program_error(name, e))?;
    }
    let prog: &mut SockOps = program(ebpf, programs::SOCKOPS)?;
    prog.load()
        .map_err(|e| program_error(programs::SOCKOPS, e))?;
    if settings.inbound.is_some() {
        let prog: &mut SkLookup = program(ebpf, programs::SK_LOOKUP)?;
        prog.load()
            .map_err(|e| program_error(programs::SK_LOOKUP, e))?;
    }
    Ok(())
}

/// Links every loaded program: into the previous process's link, or a new one.
fn link_all(
    ebpf: &mut Ebpf,
    settings: &Settings,
    cgroup: &File,
    links: &mut Links<'_>,
) -> Result<(), Error> {
    for name in programs::SOCK_ADDR {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        links.link(name, prog_fd(prog.fd(), name)?.as_fd(), || {
            // A bpf_link always coexists with other programs on the cgroup; the kernel
            // rejects the ALLOW_MULTI flag on links, so "Single" (flags 0) is right here.
            prog.attach(cgroup, CgroupAttachMode::Single)
                .map(drop)
                .map_err(|e| program_error(name, e))
        })?;
    }
    // The message redirect before sockops fills its map: no end is ever in the map without
    // the program that uses it.
    if settings.local_hop {
        attach_local_hop(ebpf)?;
        links.attached.push(programs::LOCAL_HOP);
    }
    let name = programs::SOCKOPS;
    let prog: &mut SockOps = program(ebpf, name)?;
    links.link(name, prog_fd(prog.fd(), name)?.as_fd(), || {
        prog.attach(cgroup, CgroupAttachMode::Single)
            .map(drop)
            .map_err(|e| program_error(name, e))
    })?;
    if settings.inbound.is_some() {
        let netns = File::open("/proc/self/ns/net").map_err(|source| Error::OpenCgroup {
            path: "/proc/self/ns/net".into(),
            source,
        })?;
        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = program(ebpf, name)?;
        links.link(name, prog_fd(prog.fd(), name)?.as_fd(), || {
            prog.attach(&netns)
                .map(drop)
                .map_err(|e| program_error(name, e))
        })?;
    }
    Ok(())
}

/// The inbound port policy and the listeners sk_lookup steers to.
fn fill_inbound(ebpf: &mut Ebpf, inbound: &InboundPorts, listeners: &[RawFd]) -> Result<(), Error> {
    let mut ports: HashMap<&mut MapData, u16, InboundPort> = HashMap::try_from(
        ebpf.map_mut(maps::INBOUND_PORTS)
            .ok_or(Error::MapMissing(maps::INBOUND_PORTS))?,
    )
    .map_err(map_error(maps::INBOUND_PORTS))?;
    if !inbound.all {
        for p in inbound.captured() {
            ports
                .insert(
                    p,
                    InboundPort {
                        action: INBOUND_CAPTURE,
                    },
                    0,
                )
                .map_err(map_error(maps::INBOUND_PORTS))?;
        }
    }
    // Exclusions last: they win over a port listed in both.
    for p in &inbound.exclude {
        ports
            .insert(
                p,
                InboundPort {
                    action: INBOUND_EXCLUDE,
                },
                0,
            )
            .map_err(map_error(maps::INBOUND_PORTS))?;
    }
    let mut sockmap: SockMap<&mut MapData> = SockMap::try_from(
        ebpf.map_mut(maps::INBOUND_LISTENER)
            .ok_or(Error::MapMissing(maps::INBOUND_LISTENER))?,
    )
    .map_err(map_error(maps::INBOUND_LISTENER))?;
    for (i, l) in listeners.iter().enumerate() {
        sockmap
            .set(i as u32, &Fd(*l), 0)
            .map_err(map_error(maps::INBOUND_LISTENER))?;
    }
    Ok(())
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::MapMissing(name))?;
    HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MapMissing(name))
}

/// The kernel's outboundTrafficPolicy: the mode, the CIDRs it never refuses, and its count of
/// refusals.
struct OutboundMode {
    mode: Array<MapData, u32>,
    refused: PerCpuArray<MapData, u64>,
    registry_only: Option<bool>,
}

impl OutboundMode {
    fn take(ebpf: &mut Ebpf, passthrough: &[crate::mesh::Cidr]) -> Result<Self, Error> {
        let mode = Array::try_from(take_map(ebpf, maps::OUTBOUND_MODE)?)
            .map_err(map_error(maps::OUTBOUND_MODE))?;
        let refused = PerCpuArray::try_from(take_map(ebpf, maps::REGISTRY_ONLY_REFUSED)?)
            .map_err(map_error(maps::REGISTRY_ONLY_REFUSED))?;
        let mut trie: LpmTrie<MapData, [u32; 4], u32> =
            LpmTrie::try_from(take_map(ebpf, maps::PASSTHROUGH)?)
                .map_err(map_error(maps::PASSTHROUGH))?;
        for c in passthrough {
            let k = CidrKey::new(c.addr, c.prefix);
            trie.insert(&LpmKey::new(k.prefixlen, k.addr), 1, 0)
                .map_err(map_error(maps::PASSTHROUGH))?;
        }
        Ok(Self {
            mode,
            refused,
            registry_only: None,
        })
    }
}

/// Writer of the kernel's set of captured (VIP, port) pairs and outbound mode.
pub struct Vips {
    map: HashMap<MapData, IpPort, u32>,
    current: HashSet<IpPort>,
    outbound: OutboundMode,
}

impl Vips {
    /// Makes the kernel map equal to the table's captured addresses: additions first, so a
    /// service that moves is never briefly uncaptured.
    pub fn sync(&mut self, table: &Table) -> Result<usize, Error> {
        let want: HashSet<IpPort> = table.captured().map(IpPort::from_socket_addr).collect();
        for k in want.difference(&self.current) {
            self.map.insert(k, 0, 0).map_err(|source| Error::Map {
                map: maps::VIPS,
                source,
            })?;
        }
        for k in self.current.difference(&want) {
            let _ = self.map.remove(k);
        }
        self.current = want;
        Ok(self.current.len())
    }

    /// Puts REGISTRY_ONLY (or ALLOW_ANY) in force in the kernel; true when it changed.
    pub fn set_registry_only(&mut self, on: bool) -> Result<bool, Error> {
        if self.outbound.registry_only == Some(on) {
            return Ok(false);
        }
        let mode = if on {
            OUTBOUND_REGISTRY_ONLY
        } else {
            OUTBOUND_ALLOW_ANY
        };
        self.outbound
            .mode
            .set(0, mode, 0)
            .map_err(map_error(maps::OUTBOUND_MODE))?;
        self.outbound.registry_only = Some(on);
        Ok(true)
    }

    /// Connections the kernel refused under REGISTRY_ONLY so far.
    pub fn registry_only_refused(&self) -> u64 {
        self.outbound
            .refused
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.current.contains(&IpPort::from_socket_addr(addr))
    }
}
