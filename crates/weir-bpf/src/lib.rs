//! weir's eBPF programs and everything that touches them: the libbpf-rs skeletons built from
//! bpf/ by build.rs, loading with pinned maps, attaching with pinned links, and typed access to
//! the maps. This is the only crate with `unsafe` (the generated skeletons, and viewing the
//! plain C structs as bytes).

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, MapType};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod sock_skel {
    include!(concat!(env!("OUT_DIR"), "/sock.skel.rs"));
}

pub mod datapath;
pub mod events;
pub mod kdrop;
mod kernel_btf;
pub mod mounts;
pub mod tcp_health;

/// libbpf's error (what polling a ring buffer fails with).
pub use libbpf_rs::Error as LibbpfError;
/// A ring buffer reader (as the programs' event readers return it).
pub use libbpf_rs::RingBuffer;
pub use mounts::ensure_bpffs;

pub use sock_skel::types;
use sock_skel::{SockSkel, SockSkelBuilder};

/// Errors of loading, attaching and map access, naming the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// libbpf failed.
    #[error("{what}: {source}")]
    Libbpf {
        /// What was being done (names the program, map or path).
        what: String,
        /// The cause.
        source: libbpf_rs::Error,
    },
    /// Something the program needs is not in the running kernel's BTF.
    #[error("{0}")]
    Btf(String),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn lb(what: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Libbpf { what, source }
}

/// Views a plain C struct (from the skeleton's generated types, all `Copy` and without
/// padding holes) as bytes.
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data struct generated from BTF with explicit padding fields,
    // so every byte is initialised; the slice lives as long as the borrow of `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Detaches every link pinned under `pin_dir/links` (even if another process holds it) and
/// removes `pin_dir` with the maps pinned there.
pub(crate) fn remove_pin_dir(pin_dir: &Path) -> Result<(), BpfError> {
    if let Ok(rd) = std::fs::read_dir(pin_dir.join("links")) {
        for e in rd.flatten() {
            if let Ok(l) = libbpf_rs::Link::open(e.path()) {
                let _ = l.detach();
            }
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir).map_err(|source| BpfError::Io {
            path: pin_dir.into(),
            source,
        })?;
    }
    Ok(())
}

/// An IPv6 address as the four network-order words the BPF structs hold (`__be32 addr[4]`).
pub fn ip6_words(ip: std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

/// The address held in a BPF struct's `family` and four network-order words (`AF_INET6`, or
/// IPv4 in the first word).
pub fn ip_from_words(family: u8, a: [u32; 4]) -> std::net::IpAddr {
    if family == datapath::AF_INET6 {
        std::net::IpAddr::V6(ip6_from_words(a))
    } else {
        std::net::IpAddr::from(a[0].to_ne_bytes())
    }
}

/// The IPv6 address held in four network-order words.
pub fn ip6_from_words(a: [u32; 4]) -> std::net::Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    std::net::Ipv6Addr::from(o)
}

/// Reads a plain C struct from bytes (as returned by a map lookup).
pub fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = std::mem::size_of::<T>().min(b.len());
    // SAFETY: T is plain-old-data (any bit pattern is valid) and at most size_of::<T>() bytes
    // are copied into it.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), n) };
    v
}

/// Maps earlier versions pinned in the load-balancing directory that no program uses any
/// more (a map whose layout or size changed gets a new name): unpinned on load. Programs of
/// the earlier version still attached keep theirs until they are replaced.
const RETIRED_MAPS: &[&str] = &["weir_lb_stats"];

/// Pins every map of an object being opened: load-balancing maps ([`SOCK_MAPS`]) in
/// `lb_pin_dir` (shared by the socket and per-packet programs), the others in `pin_dir`.
/// Returns the pins of another layout set aside ([`set_aside_if_incompatible`]) as (pin,
/// where it went): put back if the load fails, removed once it succeeded.
fn pin_maps(
    obj: &mut libbpf_rs::OpenObject,
    pin_dir: &Path,
    lb_pin_dir: &Path,
) -> Result<Vec<(PathBuf, PathBuf)>, BpfError> {
    let cpus = libbpf_rs::num_possible_cpus().map_err(lb("counting CPUs"))? as u32;
    let mut aside = Vec::new();
    for mut m in obj.maps_mut() {
        let name = m.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue; // .rodata and friends belong to the object
        }
        let dir = if SOCK_MAPS.contains(&name.as_str()) {
            lb_pin_dir
        } else {
            pin_dir
        };
        let path = dir.join(&name);
        // Ask for the size the kernel will give, so that the pinned map is found the same.
        let want = kernel_max_entries(m.map_type(), m.map_flags(), m.max_entries(), cpus);
        if want != m.max_entries() {
            m.set_max_entries(want)
                .map_err(lb(format!("entries of map {name}")))?;
        }
        if let Some(to) = set_aside_if_incompatible(&m, &path) {
            aside.push((path.clone(), to));
        }
        m.set_pin_path(&path)
            .map_err(lb(format!("pin path of map {name}")))?;
    }
    Ok(aside)
}

/// `BPF_F_NO_COMMON_LRU`: an LRU hash with a list per CPU.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// The entries the kernel gives a map asked for `max` of: an LRU hash with a list per CPU
/// is rounded up to a multiple of the possible CPUs (down when that overflows), as the
/// kernel's htab_map_alloc does; others get what they ask for.
fn kernel_max_entries(ty: MapType, flags: u32, max: u32, cpus: u32) -> u32 {
    let lru = matches!(ty, MapType::LruHash | MapType::LruPercpuHash);
    if !lru || flags & BPF_F_NO_COMMON_LRU == 0 || cpus <= 1 {
        return max;
    }
    max.div_ceil(cpus)
        .checked_mul(cpus)
        .unwrap_or(max / cpus * cpus)
}

/// Sets aside (renames to `NAME-replaced`) the map pinned at `path` when it is not what `m`
/// declares (what libbpf compares before it reuses a pinned map: type, key and value sizes,
/// entries, flags, map_extra), so that loading creates and pins a new one instead of
/// failing: an upgrade that changed a map's layout. Its entries are lost to the new agent
/// (it cannot read them); programs still using the old map keep it until their links are
/// switched. Returns where it went. Not compared (nor by libbpf): the inner map of a
/// map-in-map, whose layout change needs a new outer name ([`RETIRED_MAPS`]).
fn set_aside_if_incompatible(m: &libbpf_rs::OpenMapMut<'_>, path: &Path) -> Option<PathBuf> {
    let old = libbpf_rs::MapHandle::from_pinned_path(path).ok()?; // nothing pinned there
    let i = libbpf_rs::MapInfo::new(old.as_fd()).ok()?.info;
    // SAFETY: the pointer is the open map's own, valid while `m` is.
    let extra = {
        use libbpf_rs::AsRawLibbpf;
        unsafe { libbpf_sys::bpf_map__map_extra(m.as_libbpf_object().as_ptr()) }
    };
    let differ: Vec<&str> = [
        ("type", i.type_ != m.map_type() as u32),
        ("key size", i.key_size != m.key_size()),
        ("value size", i.value_size != m.value_size()),
        ("entries", i.max_entries != m.max_entries()),
        ("flags", i.map_flags != m.map_flags()),
        ("map_extra", i.map_extra != extra),
    ]
    .into_iter()
    .filter_map(|(what, differs)| differs.then_some(what))
    .collect();
    if differ.is_empty() {
        return None;
    }
    let name = path.file_name()?.to_string_lossy().into_owned();
    let to = path.with_file_name(format!("{name}-replaced"));
    tracing::warn!(
        path = %path.display(),
        differ = %differ.join(", "),
        "a pinned map of another layout (an earlier version's): replacing it, its entries are lost"
    );
    let _ = std::fs::remove_file(&to);
    std::fs::rename(path, &to).ok().map(|()| to)
}

/// The kernel config values to give the programs' `__kconfig` externs when the system has no
/// config for libbpf to read them from (`/boot/config-RELEASE` or `/proc/config.gz` under
/// `root`: without either, libbpf refuses to load an object with any, weak or not):
/// `CONFIG_HZ=0`, so that the flow table's clock falls back to the coarse clock (trace.h).
/// `None` where there is a config.
fn kconfig_fallback(root: &Path) -> Option<&'static std::ffi::CStr> {
    // SAFETY: uname fills the structure it is given.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) == 0 {
            std::ffi::CStr::from_ptr(u.release.as_ptr())
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        }
    };
    let boot = root.join("boot").join(format!("config-{release}"));
    let proc = root.join("proc/config.gz");
    // Readable, as libbpf opens it (gzopen), not merely there.
    let readable = |p: &Path| std::fs::File::open(p).is_ok();
    if readable(&boot) || readable(&proc) {
        None
    } else {
        Some(c"CONFIG_HZ=0\n")
    }
}

/// Opens and loads one object (`name`, for errors) with its maps pinned as [`pin_maps`] says,
/// reusing maps already pinned there (so state survives restarts and upgrades). The open
/// object must outlive the skeleton: one is leaked per loaded program set.
fn load_pinned<B: SkelBuilder<'static>>(
    builder: B,
    name: &str,
    pin_dir: &Path,
    lb_pin_dir: &Path,
) -> Result<<B::Output as OpenSkel<'static>>::Output, BpfError> {
    for dir in [pin_dir, lb_pin_dir] {
        std::fs::create_dir_all(dir).map_err(|source| BpfError::Io {
            path: dir.into(),
            source,
        })?;
    }
    let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
        Box::leak(Box::new(MaybeUninit::uninit()));
    let opened = match kconfig_fallback(Path::new("/")) {
        None => builder.open(storage),
        Some(kconfig) => {
            let opts = libbpf_sys::bpf_object_open_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_object_open_opts>() as _,
                kconfig: kconfig.as_ptr(), // copied by libbpf
                ..Default::default()
            };
            builder.open_opts(opts, storage)
        }
    };
    let mut open = opened.map_err(lb(format!("opening {name}")))?;
    for name in RETIRED_MAPS {
        let _ = std::fs::remove_file(lb_pin_dir.join(name));
    }
    let aside = pin_maps(open.open_object_mut(), pin_dir, lb_pin_dir)?;
    let loaded = open.load().map_err(lb(format!(
        "loading {name} (maps in {})",
        pin_dir.display()
    )));
    for (pin, to) in &aside {
        if loaded.is_ok() {
            let _ = std::fs::remove_file(to);
        } else {
            // Nothing replaced: the old map (and its entries) back where it was.
            let _ = std::fs::rename(to, pin);
        }
    }
    loaded
}

/// Every entry of a hash-like map, as plain C structs (`name` is for the error).
fn map_entries<K: Copy + Default, V: Copy + Default>(
    map: &libbpf_rs::Map<'_>,
    name: &str,
) -> Result<Vec<(K, V)>, BpfError> {
    let mut out = Vec::new();
    for k in map.keys() {
        if let Some(v) = map
            .lookup(&k, MapFlags::ANY)
            .map_err(lb(format!("reading map {name}")))?
        {
            out.push((from_bytes(&k), from_bytes(&v)));
        }
    }
    Ok(out)
}

/// Names of the socket-LB programs, in attach order, with their attach types.
pub const SOCK_PROGRAMS: &[&str] = &[
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
    "sock6_connect",
    "sock6_sendmsg",
    "sock6_recvmsg",
    "sock6_getpeername",
    "sock_ops",
];

/// Names of the socket-LB maps.
pub const SOCK_MAPS: &[&str] = &[
    "weir_lb4_svc",
    "weir_lb6_svc",
    "weir_lb4_backends",
    "weir_lb6_backends",
    "weir_lb4_revnat",
    "weir_lb6_revnat",
    "weir_lb4_sock",
    "weir_lb6_sock",
    "weir_lb_affinity",
    "weir_lb_affinity_match",
    "weir_lb_maglev",
    "weir_lb_counters",
    "weir_lb4_src_range",
    "weir_lb_groups",
    "weir_lb_outlier",
    "weir_lb_health",
    "weir_lb_outlier_sock",
    "weir_lb_events",
    "weir_sock_events",
    "weir_sock_lost",
    "weir_sock_config",
];

/// Names of the per-CPU counters in `weir_lb_counters`, by index.
pub const LB_STATS: &[&str] = &[
    "xlate_connect",
    "xlate_sendmsg",
    "xlate_rev",
    "no_backend",
    "backend_missing",
    "affinity_hit",
    "maglev",
    "revnat_update_fail",
    "weighted",
    "connect_ok",
    "connect_fail",
    "ejection",
];

/// The socket load balancer: the programs of sock.bpf.c with their maps pinned under a
/// directory, so that they outlive the agent.
pub struct SockLb {
    skel: SockSkel<'static>,
    pin_dir: PathBuf,
}

impl SockLb {
    /// Loads the programs, reusing maps pinned in `pin_dir` (so state survives restarts and
    /// upgrades) and pinning the ones that do not exist yet.
    pub fn load(pin_dir: &Path) -> Result<SockLb, BpfError> {
        let skel = load_pinned(SockSkelBuilder::default(), "sock.bpf.o", pin_dir, pin_dir)?;
        Ok(SockLb {
            skel,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    fn link_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// Attaches every program to the cgroup v2 directory `cgroup` with pinned links. Links
    /// pinned by an earlier agent are kept and switched to the new programs atomically, so an
    /// upgrade never leaves sockets unhooked.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let dir = self.link_dir();
        std::fs::create_dir_all(&dir).map_err(|source| BpfError::Io {
            path: dir.clone(),
            source,
        })?;
        let cg = std::fs::File::open(cgroup).map_err(|source| BpfError::Io {
            path: cgroup.into(),
            source,
        })?;
        for (name, prog) in self.progs() {
            let path = dir.join(name);
            if path.exists() {
                let mut link = Link::open(&path)
                    .map_err(lb(format!("opening pinned link {}", path.display())))?;
                link.update_prog(prog).map_err(lb(format!(
                    "updating link {} to the new {name}",
                    path.display()
                )))?;
                continue;
            }
            let mut link = prog.attach_cgroup(cg.as_raw_fd()).map_err(lb(format!(
                "attaching {name} to cgroup {}",
                cgroup.display()
            )))?;
            link.pin(&path)
                .map_err(lb(format!("pinning link {}", path.display())))?;
        }
        Ok(())
    }

    /// Detaches the socket programs (removes their pinned links) and keeps the maps: the
    /// socket layer stops translating, the per-packet datapath still reads the maps.
    pub fn detach(&self) -> Result<(), BpfError> {
        let dir = self.link_dir();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if let Ok(l) = Link::open(e.path()) {
                    let _ = l.detach();
                }
                std::fs::remove_file(e.path()).map_err(|source| BpfError::Io {
                    path: e.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Detaches the programs (unpins the links) and removes the pinned maps under `pin_dir`.
    pub fn remove_pins(pin_dir: &Path) -> Result<(), BpfError> {
        remove_pin_dir(pin_dir)
    }

    /// A map by name (one of [`SOCK_MAPS`]).
    pub fn map(&self, name: &str) -> &libbpf_rs::Map<'static> {
        let m = &self.skel.maps;
        match name {
            "weir_lb4_svc" => &m.weir_lb4_svc,
            "weir_lb6_svc" => &m.weir_lb6_svc,
            "weir_lb4_backends" => &m.weir_lb4_backends,
            "weir_lb6_backends" => &m.weir_lb6_backends,
            "weir_lb4_revnat" => &m.weir_lb4_revnat,
            "weir_lb6_revnat" => &m.weir_lb6_revnat,
            "weir_lb4_sock" => &m.weir_lb4_sock,
            "weir_lb6_sock" => &m.weir_lb6_sock,
            "weir_lb_affinity" => &m.weir_lb_affinity,
            "weir_lb_affinity_match" => &m.weir_lb_affinity_match,
            "weir_lb_maglev" => &m.weir_lb_maglev,
            "weir_lb_counters" => &m.weir_lb_counters,
            "weir_lb4_src_range" => &m.weir_lb4_src_range,
            "weir_lb_groups" => &m.weir_lb_groups,
            "weir_lb_outlier" => &m.weir_lb_outlier,
            "weir_lb_health" => &m.weir_lb_health,
            "weir_lb_outlier_sock" => &m.weir_lb_outlier_sock,
            "weir_lb_events" => &m.weir_lb_events,
            "weir_sock_events" => &m.weir_sock_events,
            "weir_sock_lost" => &m.weir_sock_lost,
            "weir_sock_config" => &m.weir_sock_config,
            other => panic!("no map named {other}"),
        }
    }

    /// Writes `key -> value` into map `name`.
    pub fn put<K: Copy, V: Copy>(&self, name: &str, key: &K, value: &V) -> Result<(), BpfError> {
        self.map(name)
            .update(as_bytes(key), as_bytes(value), MapFlags::ANY)
            .map_err(lb(format!("updating map {name}")))
    }

    /// Removes `key` from map `name`; a missing key is not an error.
    pub fn remove<K: Copy>(&self, name: &str, key: &K) -> Result<(), BpfError> {
        match self.map(name).delete(as_bytes(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(lb(format!("deleting from map {name}"))(e)),
        }
    }

    /// Every entry of map `name`.
    pub fn entries<K: Copy + Default, V: Copy + Default>(
        &self,
        name: &str,
    ) -> Result<Vec<(K, V)>, BpfError> {
        map_entries(self.map(name), name)
    }

    /// Puts `value` at `key` in map `name` unless an entry is there already.
    pub fn put_new<K: Copy, V: Copy>(
        &self,
        name: &str,
        key: &K,
        value: &V,
    ) -> Result<(), BpfError> {
        match self
            .map(name)
            .update(as_bytes(key), as_bytes(value), MapFlags::NO_EXIST)
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(lb(format!("updating map {name}"))(e)),
        }
    }

    /// The value at `key` in map `name`, if any.
    pub fn get<K: Copy, V: Copy + Default>(
        &self,
        name: &str,
        key: &K,
    ) -> Result<Option<V>, BpfError> {
        let v = self
            .map(name)
            .lookup(as_bytes(key), MapFlags::ANY)
            .map_err(lb(format!("reading map {name}")))?;
        Ok(v.map(|v| from_bytes(&v)))
    }

    /// (entries, capacity) of map `name`.
    pub fn usage(&self, name: &str) -> (usize, u32) {
        let map = self.map(name);
        let n = if name == "weir_lb_counters" {
            LB_STATS.len()
        } else {
            map.keys().count()
        };
        (n, map.max_entries())
    }

    /// Installs the Maglev table of service `svc_id` (backend ids, one per slot), replacing
    /// any previous one in one step.
    pub fn set_maglev(&self, svc_id: u32, table: &[u32]) -> Result<(), BpfError> {
        // BPF_F_INNER_MAP, as on the template, lets each table have its own size (kernel 5.10+).
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_sys::BPF_F_INNER_MAP,
            ..Default::default()
        };
        let inner = MapHandle::create(
            MapType::Array,
            Some(format!("weir_mgl_{svc_id}")),
            4,
            4,
            table.len().max(1) as u32,
            &opts,
        )
        .map_err(lb(format!(
            "creating the Maglev table of service {svc_id} ({} slots)",
            table.len()
        )))?;
        for (i, id) in table.iter().enumerate() {
            inner
                .update(&(i as u32).to_ne_bytes(), &id.to_ne_bytes(), MapFlags::ANY)
                .map_err(lb(format!("filling the Maglev table of service {svc_id}")))?;
        }
        let fd = inner.as_fd().as_raw_fd();
        self.map("weir_lb_maglev")
            .update(&svc_id.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb(format!(
                "installing the Maglev table of service {svc_id}"
            )))
    }

    /// Reads back the Maglev table of service `svc_id`.
    pub fn maglev(&self, svc_id: u32) -> Result<Option<Vec<u32>>, BpfError> {
        let outer = self.map("weir_lb_maglev");
        let Some(id) = outer
            .lookup(&svc_id.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading weir_lb_maglev"))?
        else {
            return Ok(None);
        };
        let map_id = u32::from_ne_bytes(id[..4].try_into().expect("4 bytes"));
        let inner =
            MapHandle::from_map_id(map_id).map_err(lb(format!("opening Maglev table {map_id}")))?;
        let mut out = vec![0u32; inner.max_entries() as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Some(v) = inner
                .lookup(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("reading a Maglev table"))?
            {
                *slot = u32::from_ne_bytes(v[..4].try_into().expect("4 bytes"));
            }
        }
        Ok(Some(out))
    }

    /// The per-CPU counters summed, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        let map = self.map("weir_lb_counters");
        let mut out = Vec::new();
        for (i, name) in LB_STATS.iter().enumerate() {
            let per_cpu = map
                .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("reading weir_lb_counters"))?;
            let sum = per_cpu
                .into_iter()
                .flatten()
                .map(|v| u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")))
                .sum();
            out.push((*name, sum));
        }
        Ok(out)
    }

    /// Every program with its name, in [`SOCK_PROGRAMS`] order.
    fn progs(&self) -> [(&'static str, &libbpf_rs::ProgramMut<'static>); 9] {
        let p = &self.skel.progs;
        [
            ("sock4_connect", &p.sock4_connect),
            ("sock4_sendmsg", &p.sock4_sendmsg),
            ("sock4_recvmsg", &p.sock4_recvmsg),
            ("sock4_getpeername", &p.sock4_getpeername),
            ("sock6_connect", &p.sock6_connect),
            ("sock6_sendmsg", &p.sock6_sendmsg),
            ("sock6_recvmsg", &p.sock6_recvmsg),
            ("sock6_getpeername", &p.sock6_getpeername),
            ("sock_ops", &p.sock_ops),
        ]
    }

    /// Where map `name` is pinned.
    pub fn pin_path(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }

    /// Turns the translation events (`weir_sock_events`) on or off.
    pub fn set_events(&self, on: bool) -> Result<(), BpfError> {
        let flags = if on { events::SOCK_CFG_EVENTS } else { 0 };
        self.put("weir_sock_config", &0u32, &types::sock_config { flags })
    }

    /// Translation events the full ring buffer refused, per point (`connect`, `sendmsg`,
    /// `recvmsg`), summed over CPUs.
    pub fn events_lost(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        let map = self.map("weir_sock_lost");
        let mut out = Vec::new();
        for point in [
            events::SOCK_XLATE_CONNECT,
            events::SOCK_XLATE_SENDMSG,
            events::SOCK_XLATE_RECVMSG,
        ] {
            let n: u64 = map
                .lookup_percpu(&u32::from(point).to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("reading weir_sock_lost"))?
                .into_iter()
                .flatten()
                .map(|v| u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")))
                .sum();
            if n > 0 {
                out.push((events::sock_point_name(point), n));
            }
        }
        Ok(out)
    }

    /// Program names with their kernel program ids, for status.
    pub fn programs(&self) -> Vec<ProgramInfo> {
        self.progs()
            .into_iter()
            .map(|(name, prog)| prog_info(name, prog.as_fd().as_raw_fd()))
            .collect()
    }
}

/// A reader of the ejection events of the ring buffer pinned at `path` (`weir_lb_events`);
/// `f` gets each event. The map handle lives as long as the process.
pub fn watch_ejections<F: FnMut(&types::lb_ejection_event) + 'static>(
    path: &Path,
    mut f: F,
) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
    watch_pinned_ring(path, move |data: &[u8]| {
        if data.len() >= std::mem::size_of::<types::lb_ejection_event>() {
            f(&from_bytes::<types::lb_ejection_event>(data));
        }
    })
}

/// A reader of the ring buffer pinned at `path`, calling `f` with each record. The map
/// handle lives as long as the process.
pub(crate) fn watch_pinned_ring<F: FnMut(&[u8]) + 'static>(
    path: &Path,
    f: F,
) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
    let what = format!("reading the ring buffer {}", path.display());
    let map: &'static MapHandle = Box::leak(Box::new(
        MapHandle::from_pinned_path(path).map_err(lb(&what))?,
    ));
    ring_reader(&[map], &what, f)
}

/// A reader of the ring buffers `maps` (polled together), calling `f` with each record
/// (`what`: for errors). Poll it on the thread that made it.
pub(crate) fn ring_reader<F: FnMut(&[u8]) + 'static>(
    maps: &[&dyn libbpf_rs::MapCore],
    what: &str,
    f: F,
) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
    let f = std::rc::Rc::new(std::cell::RefCell::new(f));
    let mut b = libbpf_rs::RingBufferBuilder::new();
    for map in maps {
        let f = f.clone();
        b.add(*map, move |data: &[u8]| {
            (f.borrow_mut())(data);
            0
        })
        .map_err(lb(what))?;
    }
    b.build().map_err(lb(what))
}

/// A loaded program as the kernel reports it.
#[derive(Debug, Clone, Default)]
pub struct ProgramInfo {
    /// Program name.
    pub name: &'static str,
    /// Kernel program id.
    pub id: u32,
    /// Runs counted while `kernel.bpf_stats_enabled` is 1.
    pub run_count: u64,
    /// Total run time of those runs, in nanoseconds.
    pub run_time_ns: u64,
    /// Instructions the verifier walked to accept it (of its limit, 1,000,000).
    pub verified_insns: u32,
}

/// The kernel's information about the program behind `fd` (zeros if it cannot be read).
pub(crate) fn prog_info(name: &'static str, fd: i32) -> ProgramInfo {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is a properly sized, writable bpf_prog_info and `len` says its size.
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    if ret != 0 {
        return ProgramInfo {
            name,
            ..Default::default()
        };
    }
    ProgramInfo {
        name,
        id: info.id,
        run_count: info.run_cnt,
        run_time_ns: info.run_time_ns,
        verified_insns: info.verified_insns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_get_a_kernel_config_only_where_the_system_has_none() {
        let root = std::env::temp_dir().join(format!("weir-kconfig-{}", std::process::id()));
        std::fs::create_dir_all(root.join("proc")).unwrap();
        assert_eq!(
            kconfig_fallback(&root).map(|c| c.to_str().unwrap()),
            Some("CONFIG_HZ=0\n")
        );
        std::fs::write(root.join("proc/config.gz"), b"").unwrap();
        assert_eq!(kconfig_fallback(&root), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_per_cpu_lru_is_sized_as_the_kernel_sizes_it() {
        let per_cpu = BPF_F_NO_COMMON_LRU;
        assert_eq!(
            kernel_max_entries(MapType::LruHash, per_cpu, 65536, 6),
            65538
        );
        assert_eq!(
            kernel_max_entries(MapType::LruHash, per_cpu, 65536, 2),
            65536
        );
        assert_eq!(
            kernel_max_entries(MapType::LruPercpuHash, per_cpu, 100, 48),
            144
        );
        assert_eq!(
            kernel_max_entries(MapType::LruHash, per_cpu, u32::MAX, 6),
            4_294_967_292
        );
        // A common LRU, or another type: as asked.
        assert_eq!(kernel_max_entries(MapType::LruHash, 0, 65536, 6), 65536);
        assert_eq!(kernel_max_entries(MapType::Hash, per_cpu, 65536, 6), 65536);
    }
}
