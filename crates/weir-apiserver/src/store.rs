//! The object store: every object in memory for reads, every write persisted to redb in one
//! transaction with its watch event, a bounded event history for watches that resume, and
//! the write semantics of kube-apiserver (defaults, allocation, validation, optimistic
//! concurrency, graceful Pod deletion, Namespace termination).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use weir_model::kinds::{self, ResourceKind};
use weir_model::{defaults, strategy, validate};

use crate::alloc::{AllocConfig, Allocations};
use crate::error::ApiError;
use crate::patch::{self, PatchType};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name: `ADDED`, `MODIFIED`, `DELETED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADDED" => EventType::Added,
            "MODIFIED" => EventType::Modified,
            "DELETED" => EventType::Deleted,
            _ => return None,
        })
    }
}

/// One change to one object, with the revision that made it.
#[derive(Debug)]
pub struct Event {
    /// Revision (the object's new `metadata.resourceVersion`).
    pub rev: u64,
    /// Kind of the object.
    pub kind: &'static ResourceKind,
    /// What happened.
    pub ty: EventType,
    /// The object after the change (for Deleted: its last state).
    pub object: Arc<Value>,
    /// The object before the change, for Modified and Deleted; watches with selectors use it
    /// to turn an object leaving the selection into DELETED and entering into ADDED.
    pub prev: Option<Arc<Value>>,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Service CIDRs and NodePort range.
    pub alloc: AllocConfig,
    /// How many events are kept for watches that resume from a resourceVersion.
    pub history: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            alloc: AllocConfig::default(),
            history: 10_000,
        }
    }
}

/// Store key: kind, namespace ("" for cluster-scoped), name.
pub type Key = (&'static str, String, String);

struct State {
    objects: BTreeMap<Key, Arc<Value>>,
    rev: u64,
    /// Every event with a revision <= `compacted` has been dropped from the history.
    compacted: u64,
    log: VecDeque<Arc<Event>>,
    alloc: Allocations,
}

/// Options shared by writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOpts {
    /// `dryRun=All`: do every check, persist nothing.
    pub dry_run: bool,
}

/// Options of a DELETE.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `gracePeriodSeconds` from the body or query.
    pub grace_period: Option<i64>,
    /// `preconditions.resourceVersion`.
    pub precondition_rv: Option<String>,
    /// `preconditions.uid`.
    pub precondition_uid: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// Where a watch starts.
pub enum WatchStart {
    /// Current objects of the kind (synthetic ADDED), at this revision.
    Snapshot(Vec<Arc<Value>>, u64),
    /// Events after the requested revision.
    Backlog(Vec<Arc<Event>>),
}

/// The store. Reads take a short lock; writes are serialised and each is one redb commit.
pub struct Store {
    state: Mutex<State>,
    db: Database,
    events: broadcast::Sender<Arc<Event>>,
    cfg: StoreConfig,
}

fn key_string(k: &Key) -> String {
    format!("{}/{}/{}", k.0, k.1, k.2)
}

fn db_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage error: {e}"))
}

fn meta_str<'a>(v: &'a Value, f: &str) -> Option<&'a str> {
    v.get("metadata")?.get(f)?.as_str()
}

fn set_meta(v: &mut Value, f: &str, val: Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(f.to_string(), val);
    }
}

fn new_uid() -> String {
    // RFC 4122 version 4: random, with the version and variant bits set.
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn timestamp_in(secs: i64) -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn kind_by_name(kind: &str) -> Option<&'static ResourceKind> {
    kinds::ALL.iter().find(|k| k.kind == kind)
}

impl Store {
    /// Opens (or creates) the store in `dir`, loading every object and the event history.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Arc<Store>, ApiError> {
        std::fs::create_dir_all(dir).map_err(db_err)?;
        let db = Database::create(dir.join("store.redb")).map_err(db_err)?;
        {
            let w = db.begin_write().map_err(db_err)?;
            w.open_table(OBJECTS).map_err(db_err)?;
            w.open_table(EVENTS).map_err(db_err)?;
            w.open_table(META).map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        let mut st = State {
            objects: BTreeMap::new(),
            rev: 0,
            compacted: 0,
            log: VecDeque::new(),
            alloc: Allocations::default(),
        };
        {
            let r = db.begin_read().map_err(db_err)?;
            let meta = r.open_table(META).map_err(db_err)?;
            st.rev = meta
                .get("rev")
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            st.compacted = meta
                .get("compacted")
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            let objs = r.open_table(OBJECTS).map_err(db_err)?;
            for item in objs.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let mut parts = k.value().splitn(3, '/');
                let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let Some(rk) = kind_by_name(kind) else {
                    continue;
                };
                let obj: Value = serde_json::from_slice(v.value()).map_err(db_err)?;
                if rk.kind == "Service" {
                    st.alloc.add(&obj);
                }
                st.objects
                    .insert((rk.kind, ns.to_string(), name.to_string()), Arc::new(obj));
            }
            let evs = r.open_table(EVENTS).map_err(db_err)?;
            for item in evs.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let e: Value = serde_json::from_slice(v.value()).map_err(db_err)?;
                let (Some(kind), Some(ty)) = (
                    e["kind"].as_str().and_then(kind_by_name),
                    e["type"].as_str().and_then(EventType::parse),
                ) else {
                    continue;
                };
                st.log.push_back(Arc::new(Event {
                    rev: k.value(),
                    kind,
                    ty,
                    object: Arc::new(e["object"].clone()),
                    prev: (!e["prev"].is_null()).then(|| Arc::new(e["prev"].clone())),
                }));
            }
        }
        let (events, _) = broadcast::channel(16384);
        let store = Arc::new(Store {
            state: Mutex::new(st),
            db,
            events,
            cfg,
        });
        store.ensure_system_namespaces()?;
        Ok(store)
    }

    fn ensure_system_namespaces(&self) -> Result<(), ApiError> {
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if self.get(&kinds::NAMESPACE, None, ns).is_none() {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                self.create(&kinds::NAMESPACE, None, obj, WriteOpts::default())?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.lock().rev
    }

    /// One object.
    pub fn get(&self, kind: &ResourceKind, ns: Option<&str>, name: &str) -> Option<Arc<Value>> {
        let key = make_key(kind, ns, name);
        self.lock().objects.get(&key).cloned()
    }

    /// All objects of `kind` (in namespace `ns` if given), sorted by namespace and name, and
    /// the revision they were read at.
    pub fn list(&self, kind: &ResourceKind, ns: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let st = self.lock();
        (Self::list_locked(&st, kind, ns), st.rev)
    }

    fn list_locked(st: &State, kind: &ResourceKind, ns: Option<&str>) -> Vec<Arc<Value>> {
        let start = (kind.kind, ns.unwrap_or("").to_string(), String::new());
        st.objects
            .range(start..)
            .take_while(|(k, _)| k.0 == kind.kind && ns.is_none_or(|n| k.1 == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Subscribes to events and says where the watch starts: from a snapshot when `from` is
    /// None, else from the history after `from` (410 Expired if it was compacted away).
    pub fn watch(
        &self,
        kind: &ResourceKind,
        from: Option<u64>,
    ) -> Result<(WatchStart, broadcast::Receiver<Arc<Event>>, u64), ApiError> {
        let st = self.lock();
        let rx = self.events.subscribe();
        match from {
            None => Ok((
                WatchStart::Snapshot(Self::list_locked(&st, kind, None), st.rev),
                rx,
                st.rev,
            )),
            Some(rv) if rv < st.compacted => Err(ApiError::expired(rv, st.compacted + 1)),
            Some(rv) => {
                let backlog = st.log.iter().filter(|e| e.rev > rv).cloned().collect();
                Ok((WatchStart::Backlog(backlog), rx, st.rev.max(rv)))
            }
        }
    }

    /// Writes `changes` (new object, or None to remove) in one transaction, assigning each a
    /// new revision, then publishes their events. Returns the stored objects.
    fn persist(
        &self,
        st: &mut State,
        changes: Vec<(Key, Option<Value>)>,
    ) -> Result<Vec<Arc<Value>>, ApiError> {
        let mut events = Vec::new();
        let mut rev = st.rev;
        for (key, new) in changes {
            rev += 1;
            let kind = kind_by_name(key.0).expect("known kind");
            let prev = st.objects.get(&key).cloned();
            let (ty, obj) = match new {
                Some(mut v) => {
                    set_meta(&mut v, "resourceVersion", Value::String(rev.to_string()));
                    (
                        if prev.is_some() {
                            EventType::Modified
                        } else {
                            EventType::Added
                        },
                        v,
                    )
                }
                None => {
                    let mut v = prev.as_deref().cloned().unwrap_or(Value::Null);
                    set_meta(&mut v, "resourceVersion", Value::String(rev.to_string()));
                    (EventType::Deleted, v)
                }
            };
            events.push(Event {
                rev,
                kind,
                ty,
                object: Arc::new(obj),
                prev,
            });
        }
        let mut drop_upto = st.compacted;
        let overflow = (st.log.len() + events.len()).saturating_sub(self.cfg.history);
        if overflow > 0 {
            drop_upto = st
                .log
                .get(overflow.min(st.log.len()) - 1)
                .map(|e| e.rev)
                .unwrap_or(drop_upto);
        }
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut objs = w.open_table(OBJECTS).map_err(db_err)?;
            let mut evs = w.open_table(EVENTS).map_err(db_err)?;
            let mut meta = w.open_table(META).map_err(db_err)?;
            for e in &events {
                let key = (
                    e.kind.kind,
                    meta_str(&e.object, "namespace").unwrap_or("").to_string(),
                    meta_str(&e.object, "name").unwrap_or("").to_string(),
                );
                let ks = key_string(&key);
                if e.ty == EventType::Deleted {
                    objs.remove(ks.as_str()).map_err(db_err)?;
                } else {
                    let bytes = serde_json::to_vec(&*e.object).map_err(db_err)?;
                    objs.insert(ks.as_str(), bytes.as_slice()).map_err(db_err)?;
                }
                let ev = json!({"type": e.ty.as_str(), "kind": e.kind.kind, "object": &*e.object, "prev": e.prev.as_deref()});
                evs.insert(e.rev, serde_json::to_vec(&ev).map_err(db_err)?.as_slice())
                    .map_err(db_err)?;
            }
            if drop_upto > st.compacted {
                for r in st.log.iter().take_while(|e| e.rev <= drop_upto) {
                    evs.remove(r.rev).map_err(db_err)?;
                }
                meta.insert("compacted", drop_upto).map_err(db_err)?;
            }
            meta.insert("rev", rev).map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;

        st.rev = rev;
        while st.log.front().is_some_and(|e| e.rev <= drop_upto) {
            st.log.pop_front();
        }
        st.compacted = drop_upto;
        let mut out = Vec::new();
        for e in events {
            let key = (
                e.kind.kind,
                meta_str(&e.object, "namespace").unwrap_or("").to_string(),
                meta_str(&e.object, "name").unwrap_or("").to_string(),
            );
            if e.kind.kind == "Service" {
                if let Some(p) = &e.prev {
                    st.alloc.remove(p);
                }
                if e.ty != EventType::Deleted {
                    st.alloc.add(&e.object);
                }
            }
            if e.ty == EventType::Deleted {
                st.objects.remove(&key);
            } else {
                st.objects.insert(key, e.object.clone());
            }
            out.push(e.object.clone());
            let e = Arc::new(e);
            st.log.push_back(e.clone());
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(e);
        }
        Ok(out)
    }

    fn check_namespace(
        st: &State,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        if !kind.namespaced {
            return Ok(());
        }
        match st.objects.get(&("Namespace", String::new(), ns.to_string())) {
            None => Err(ApiError::not_found("namespaces", ns)),
            Some(n) if n.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null()) => Err(ApiError::forbidden(
                kind.plural,
                name,
                format!("{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated", kind.plural),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Defaults, prepares (as the kind's registry strategy), validates and allocates `obj` as
    /// the new state of an object.
    fn prepare(
        &self,
        st: &mut State,
        kind: &ResourceKind,
        obj: &mut Value,
        write: strategy::Write<'_>,
    ) -> Result<(), ApiError> {
        let old = match write {
            strategy::Write::Create => None,
            strategy::Write::Update(o) | strategy::Write::Status(o) => Some(o),
        };
        defaults::apply_defaults(kind, obj);
        strategy::prepare(kind, obj, write);
        validate::validate(kind, obj, old).map_err(|e| ApiError::invalid(kind.group, &e))?;
        if kind.kind == "Service" {
            st.alloc
                .allocate(&self.cfg.alloc, obj, old)
                .map_err(|e| ApiError::invalid(kind.group, &e))?;
            if obj.pointer("/status").is_none_or(Value::is_null) {
                obj["status"] = json!({"loadBalancer": {}});
            }
        }
        Ok(())
    }

    fn check_body(kind: &ResourceKind, obj: &Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str) {
            if k != kind.kind {
                return Err(ApiError::bad_request(format!(
                    "the kind of the object ({k}) does not match the kind of the request ({})",
                    kind.kind
                )));
            }
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
            if av != kind.api_version() {
                return Err(ApiError::bad_request(format!(
                    "the API version of the object ({av}) does not match the request ({})",
                    kind.api_version()
                )));
            }
        }
        Ok(())
    }

    /// Creates an object (POST). `ns` is the namespace of the request path.
    pub fn create(
        &self,
        kind: &'static ResourceKind,
        ns: Option<&str>,
        mut obj: Value,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        Self::check_body(kind, &obj)?;
        obj["kind"] = json!(kind.kind);
        // Stored in the kind's storage version whatever version wrote it (the HTTP layer
        // shows each version its own apiVersion).
        obj["apiVersion"] = json!(kinds::storage_version(kind).api_version());
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        if kind.namespaced {
            let body_ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
            let ns = match ns {
                Some(n) => n.to_string(),
                None if !body_ns.is_empty() => body_ns.clone(),
                None => {
                    return Err(ApiError::bad_request(
                        "a namespace is required to create a namespaced object",
                    ))
                }
            };
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
            }
            set_meta(&mut obj, "namespace", json!(ns));
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        if meta_str(&obj, "name").unwrap_or_default().is_empty() {
            if let Some(g) = meta_str(&obj, "generateName").map(str::to_string) {
                set_meta(&mut obj, "name", json!(format!("{g}{}", random_suffix())));
            }
        }
        if meta_str(&obj, "resourceVersion").is_some_and(|r| !r.is_empty()) {
            return Err(ApiError::invalid(
                kind.group,
                &weir_model::ValidationError {
                    kind: kind.kind.into(),
                    name: meta_str(&obj, "name").unwrap_or_default().into(),
                    causes: vec![weir_model::FieldError {
                        field: "metadata.resourceVersion".into(),
                        kind: validate::FieldErrorType::Invalid(
                            json!(meta_str(&obj, "resourceVersion")),
                            "must not be set on objects to be created".into(),
                        ),
                    }],
                },
            ));
        }
        for f in [
            "uid",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove(f);
            }
        }
        set_meta(&mut obj, "uid", json!(new_uid()));
        set_meta(
            &mut obj,
            "creationTimestamp",
            json!(weir_model::now_rfc3339()),
        );
        set_meta(&mut obj, "generation", json!(1));
        if matches!(kind.kind, "Pod" | "Service") {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let ns_s = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        let mut st = self.lock();
        Self::check_namespace(&st, kind, &ns_s, &name)?;
        let key = (kind.kind, ns_s, name.clone());
        if !name.is_empty() && st.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind.plural, &name));
        }
        self.prepare(&mut st, kind, &mut obj, strategy::Write::Create)?;
        if opts.dry_run {
            return Ok(Arc::new(obj));
        }
        Ok(self.persist(&mut st, vec![(key, Some(obj))])?.remove(0))
    }

    /// Replaces an object (PUT), or only its status when `status_only`.
    pub fn update(
        &self,
        kind: &'static ResourceKind,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        status_only: bool,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        Self::check_body(kind, &obj)?;
        let mut st = self.lock();
        let key = make_key(kind, ns, name);
        let old = st
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind.plural, name))?;
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        match meta_str(&obj, "resourceVersion") {
            None | Some("") => {
                return Err(ApiError::invalid(
                    kind.group,
                    &weir_model::ValidationError {
                        kind: kind.kind.into(),
                        name: name.into(),
                        causes: vec![weir_model::FieldError {
                            field: "metadata.resourceVersion".into(),
                            kind: validate::FieldErrorType::Invalid(
                                json!("0x0"),
                                "must be specified for an update".into(),
                            ),
                        }],
                    },
                ))
            }
            Some(rv) if Some(rv) != meta_str(&old, "resourceVersion") => {
                return Err(ApiError::conflict(kind.plural, name))
            }
            Some(_) => {}
        }
        self.update_locked(&mut st, kind, key, &old, obj, status_only, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        st: &mut State,
        kind: &'static ResourceKind,
        key: Key,
        old: &Value,
        obj: Value,
        status_only: bool,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            n
        } else {
            let mut n = obj;
            if kind.has_status && kind.kind != "Namespace" {
                match old.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        };
        new["kind"] = json!(kind.kind);
        new["apiVersion"] = json!(kinds::storage_version(kind).api_version());
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "generation",
        ] {
            match old.pointer(&format!("/metadata/{f}")) {
                Some(v) => set_meta(&mut new, f, v.clone()),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        if kind.kind == "Namespace" && !status_only {
            new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
        }
        let write = if status_only {
            strategy::Write::Status(old)
        } else {
            strategy::Write::Update(old)
        };
        self.prepare(st, kind, &mut new, write)?;
        if new.get("spec") != old.get("spec") {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            set_meta(&mut new, "generation", json!(g + 1));
        }
        set_meta(
            &mut new,
            "resourceVersion",
            old["metadata"]["resourceVersion"].clone(),
        );
        if &new == old {
            return Ok(Arc::new(new));
        }
        if opts.dry_run {
            return Ok(Arc::new(new));
        }
        Ok(self.persist(st, vec![(key, Some(new))])?.remove(0))
    }

    /// Patches an object (PATCH). Server-side apply creates it when absent (second value true).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        kind: &'static ResourceKind,
        ns: Option<&str>,
        name: &str,
        pt: PatchType,
        body: &[u8],
        status_only: bool,
        opts: WriteOpts,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let p = patch::parse_body(pt, body)?;
        let key = make_key(kind, ns, name);
        {
            let mut st = self.lock();
            if let Some(old) = st.objects.get(&key).cloned() {
                let mut target = (*old).clone();
                patch::apply(pt, &mut target, &p)?;
                // A patch may carry a resourceVersion as a precondition; otherwise it applies
                // to the current version.
                let want = p
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if let Some(rv) = want {
                    if Some(rv) != meta_str(&old, "resourceVersion") {
                        return Err(ApiError::conflict(kind.plural, name));
                    }
                }
                set_meta(
                    &mut target,
                    "resourceVersion",
                    old["metadata"]["resourceVersion"].clone(),
                );
                if meta_str(&target, "name") != Some(name) {
                    return Err(ApiError::bad_request(
                        "metadata.name may not be changed by a patch",
                    ));
                }
                return Ok((
                    self.update_locked(&mut st, kind, key, &old, target, status_only, opts)?,
                    false,
                ));
            }
        }
        if pt != PatchType::Apply {
            return Err(ApiError::not_found(kind.plural, name));
        }
        let mut obj = p;
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        set_meta(&mut obj, "name", json!(name));
        Ok((self.create(kind, ns, obj, opts)?, true))
    }

    /// Deletes an object (DELETE). Pods bound to a node get a grace period: they are marked
    /// with `deletionTimestamp` and removed when the kubelet confirms (a delete with grace 0)
    /// or the grace period ends. Namespaces are marked Terminating and removed once empty.
    pub fn delete(
        &self,
        kind: &'static ResourceKind,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let mut st = self.lock();
        let key = make_key(kind, ns, name);
        let old = st
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind.plural, name))?;
        if let Some(rv) = &opts.precondition_rv {
            if Some(rv.as_str()) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(kind.plural, name));
            }
        }
        if let Some(uid) = &opts.precondition_uid {
            if Some(uid.as_str()) != meta_str(&old, "uid") {
                return Err(ApiError::conflict(kind.plural, name));
            }
        }
        let wo = WriteOpts {
            dry_run: opts.dry_run,
        };
        match kind.kind {
            "Pod" => self.delete_pod(&mut st, key, &old, opts.grace_period, wo),
            "Namespace" => {
                if old
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    return Ok(old);
                }
                let mut n = (*old).clone();
                set_meta(
                    &mut n,
                    "deletionTimestamp",
                    json!(weir_model::now_rfc3339()),
                );
                n["status"] = json!({"phase": "Terminating"});
                if wo.dry_run {
                    return Ok(Arc::new(n));
                }
                let out = self.persist(&mut st, vec![(key, Some(n))])?.remove(0);
                self.finalize_namespaces(&mut st)?;
                Ok(out)
            }
            _ => {
                if wo.dry_run {
                    return Ok(old);
                }
                Ok(self.persist(&mut st, vec![(key, None)])?.remove(0))
            }
        }
    }

    fn delete_pod(
        &self,
        st: &mut State,
        key: Key,
        old: &Arc<Value>,
        grace: Option<i64>,
        wo: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let grace = grace
            .or_else(|| {
                old.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0);
        let unscheduled = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty();
        let finished = matches!(
            old.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if grace == 0 || unscheduled || finished {
            if wo.dry_run {
                return Ok(old.clone());
            }
            return Ok(self.persist(st, vec![(key, None)])?.remove(0));
        }
        let current = old
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        if current.is_some_and(|c| c <= grace) {
            return Ok(old.clone());
        }
        let mut n = (**old).clone();
        set_meta(&mut n, "deletionTimestamp", json!(timestamp_in(grace)));
        set_meta(&mut n, "deletionGracePeriodSeconds", json!(grace));
        if wo.dry_run {
            return Ok(Arc::new(n));
        }
        Ok(self.persist(st, vec![(key, Some(n))])?.remove(0))
    }

    /// Removes what is due: Pods whose grace period has ended, and the contents of
    /// Terminating namespaces (then the namespaces once empty). Called about once a second.
    pub fn tick(&self) -> Result<(), ApiError> {
        let mut st = self.lock();
        let now = jiff::Timestamp::now();
        let due: Vec<Key> = kind_range(&st.objects, "Pod")
            .filter(|(_, v)| {
                v.pointer("/metadata/deletionTimestamp")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !due.is_empty() {
            self.persist(&mut st, due.into_iter().map(|k| (k, None)).collect())?;
        }
        self.finalize_namespaces(&mut st)
    }

    fn finalize_namespaces(&self, st: &mut State) -> Result<(), ApiError> {
        let terminating: Vec<String> = kind_range(&st.objects, "Namespace")
            .filter(|(_, v)| {
                v.pointer("/metadata/deletionTimestamp")
                    .is_some_and(|t| !t.is_null())
            })
            .map(|(k, _)| k.2.clone())
            .collect();
        for ns in terminating {
            let contents: Vec<(Key, Arc<Value>)> = st
                .objects
                .iter()
                .filter(|(k, _)| k.0 != "Namespace" && k.1 == ns)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if contents.is_empty() {
                self.persist(st, vec![(("Namespace", String::new(), ns), None)])?;
                continue;
            }
            let mut now_gone = Vec::new();
            for (k, v) in contents {
                if k.0 == "Pod" {
                    if v.pointer("/metadata/deletionTimestamp")
                        .is_none_or(Value::is_null)
                    {
                        self.delete_pod(st, k, &v, None, WriteOpts::default())?;
                    }
                } else {
                    now_gone.push((k, None));
                }
            }
            if !now_gone.is_empty() {
                self.persist(st, now_gone)?;
            }
        }
        Ok(())
    }
}

/// The stored objects of one kind (a range of the ordered map, not a scan of all kinds).
fn kind_range<'a>(
    objects: &'a BTreeMap<Key, Arc<Value>>,
    kind: &'static str,
) -> impl Iterator<Item = (&'a Key, &'a Arc<Value>)> {
    objects
        .range((kind, String::new(), String::new())..)
        .take_while(move |(k, _)| k.0 == kind)
}

/// The store key of an object.
pub fn make_key(kind: &ResourceKind, ns: Option<&str>, name: &str) -> Key {
    let ns = if kind.namespaced {
        ns.unwrap_or("default")
    } else {
        ""
    };
    (kind.kind, ns.to_string(), name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_model::kinds::*;

    fn open() -> (tempfile::TempDir, Arc<Store>) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), StoreConfig::default()).unwrap();
        (d, s)
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})
    }

    #[test]
    fn create_get_conflict_and_restart() {
        let (d, s) = open();
        let created = s
            .create(&POD, Some("default"), pod("p", ""), WriteOpts::default())
            .unwrap();
        assert_eq!(created["metadata"]["namespace"], "default");
        assert_eq!(created["status"]["phase"], "Pending");
        assert_eq!(
            s.create(&POD, Some("default"), pod("p", ""), WriteOpts::default())
                .unwrap_err()
                .code,
            409
        );
        assert_eq!(
            s.create(&POD, Some("nope"), pod("q", ""), WriteOpts::default())
                .unwrap_err()
                .code,
            404
        );
        let mut stale = (*created).clone();
        stale["metadata"]["labels"] = json!({"a": "b"});
        s.update(
            &POD,
            Some("default"),
            "p",
            stale.clone(),
            false,
            WriteOpts::default(),
        )
        .unwrap();
        let err = s
            .update(
                &POD,
                Some("default"),
                "p",
                stale,
                false,
                WriteOpts::default(),
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let rev = s.revision();
        drop(s);
        let s = Store::open(d.path(), StoreConfig::default()).unwrap();
        assert_eq!(s.revision(), rev);
        assert_eq!(
            s.get(&POD, Some("default"), "p").unwrap()["metadata"]["labels"]["a"],
            "b"
        );
        let (start, _rx, _) = s.watch(&POD, Some(rev - 1)).unwrap();
        match start {
            WatchStart::Backlog(b) => assert_eq!(b.len(), 1),
            _ => panic!("backlog expected"),
        }
    }

    #[test]
    fn graceful_pod_delete_and_namespace_termination() {
        let (_d, s) = open();
        s.create(
            &NAMESPACE,
            None,
            json!({"metadata": {"name": "x"}}),
            WriteOpts::default(),
        )
        .unwrap();
        s.create(&POD, Some("x"), pod("p", "n1"), WriteOpts::default())
            .unwrap();
        let d = s
            .delete(
                &POD,
                Some("x"),
                "p",
                &DeleteOpts {
                    grace_period: Some(60),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(d["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(&POD, Some("x"), "p").is_some());
        s.delete(&NAMESPACE, None, "x", &DeleteOpts::default())
            .unwrap();
        assert_eq!(
            s.create(&POD, Some("x"), pod("q", "n1"), WriteOpts::default())
                .unwrap_err()
                .code,
            403
        );
        s.delete(
            &POD,
            Some("x"),
            "p",
            &DeleteOpts {
                grace_period: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        s.tick().unwrap();
        assert!(s.get(&NAMESPACE, None, "x").is_none());
    }

    #[test]
    fn history_is_compacted() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(
            d.path(),
            StoreConfig {
                history: 5,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..10 {
            s.create(
                &POD,
                Some("default"),
                pod(&format!("p{i}"), ""),
                WriteOpts::default(),
            )
            .unwrap();
        }
        assert_eq!(s.watch(&POD, Some(1)).err().unwrap().code, 410);
        assert!(s.watch(&POD, Some(s.revision() - 3)).is_ok());
    }
}
