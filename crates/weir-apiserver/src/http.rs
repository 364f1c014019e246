//! The REST front end: routing of Kubernetes API paths, discovery, list/get/watch and the
//! write verbs, over HTTP/1.1 or HTTP/2, with TLS and bearer-token authentication.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use weir_model::kinds::{self, ResourceKind};
use weir_model::{print, FieldSelector, LabelSelector};

use crate::error::ApiError;
use crate::patch::PatchType;
use crate::runtime_config::RuntimeConfig;
use crate::store::{DeleteOpts, Event, EventType, Store, WatchStart, WriteOpts};

/// Response body: a whole document or a watch stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Shared state of the HTTP handlers.
pub struct Api {
    /// The object store.
    pub store: Arc<Store>,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// How often idle watches get a BOOKMARK (when the client allows bookmarks).
    pub bookmark_interval: Duration,
    /// Which kinds are served (`--runtime-config`).
    pub runtime_config: RuntimeConfig,
}

fn full(code: StatusCode, ct: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", ct)
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .expect("response")
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    full(
        code,
        "application/json",
        serde_json::to_vec(v).expect("json"),
    )
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// A parsed resource path.
struct Target {
    kind: &'static ResourceKind,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some(ns.to_string()), {
                let mut v = vec![*plural];
                v.extend_from_slice(tail);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return Err(ApiError::no_route(path)),
    };
    let kind = kinds::by_plural(group, version, plural).ok_or_else(|| ApiError::no_route(path))?;
    if ns.is_some() && !kind.namespaced {
        return Err(ApiError::no_route(path));
    }
    if let Some(s) = &sub {
        if s != "status" || !kind.has_status {
            return Err(ApiError::no_route(path));
        }
    }
    Ok(Target {
        kind,
        ns,
        name,
        sub,
    })
}

fn discovery_resources(rc: &RuntimeConfig, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds::ALL
        .iter()
        .filter(|k| k.group == group && k.version == version && rc.serves(k))
    {
        resources.push(json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names,
        }));
        if k.has_status {
            resources.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn discovery_groups(rc: &RuntimeConfig) -> Value {
    // One entry per group with every version it serves; the first is the preferred one.
    let mut groups: Vec<(&str, Vec<Value>)> = Vec::new();
    for (g, v) in kinds::group_versions() {
        let served = kinds::ALL
            .iter()
            .any(|k| k.group == g && k.version == v && rc.serves(k));
        if g.is_empty() || !served {
            continue;
        }
        let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
        match groups.iter_mut().find(|(name, _)| *name == g) {
            Some((_, versions)) => versions.push(gv),
            None => groups.push((g, vec![gv])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            json!({"name": g, "preferredVersion": versions[0].clone(), "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `obj` as the version `kind` serves it: a kind served in several versions stores each
/// object once, and every version shows it under its own `apiVersion` (their schemas are
/// the same, so nothing else changes, as for a CRD without a conversion webhook).
/// Borrowed as it is when its `apiVersion` is already the one asked for (every kind served
/// in one version, and the storage version).
fn in_version<'a>(kind: &ResourceKind, obj: &'a Value) -> Cow<'a, Value> {
    let want = kind.api_version();
    if obj.get("kind").and_then(Value::as_str) == Some(kind.kind)
        && obj.get("apiVersion").and_then(Value::as_str) != Some(want.as_str())
    {
        let mut o = obj.clone();
        o["apiVersion"] = json!(want);
        return Cow::Owned(o);
    }
    Cow::Borrowed(obj)
}

fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

fn table(kind: &ResourceKind, objs: &[Arc<Value>], rv: &str, with_columns: bool) -> Value {
    let now = jiff::Timestamp::now();
    let cols: Vec<Value> = print::columns(kind)
        .iter()
        .map(|c| json!({"name": c.name, "type": "string", "format": if c.name == "Name" { "name" } else { "" }, "description": "", "priority": c.priority}))
        .collect();
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            json!({"cells": print::row(kind, o, now), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(Value::Null)}})
        })
        .collect();
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "rows": rows});
    if with_columns {
        t["columnDefinitions"] = Value::Array(cols);
    }
    t
}

struct Filter {
    kind: &'static ResourceKind,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let ns_ok = match &self.ns {
            Some(ns) => obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns),
            None => true,
        };
        ns_ok && self.labels.matches_object(obj) && self.fields.matches_object(obj)
    }

    /// What a watcher with this filter sees of an event: an object entering the selection is
    /// ADDED, one leaving it is DELETED, as kube-apiserver's watch cache does.
    fn view<'a>(&self, e: &'a Event) -> Option<(&'static str, &'a Value)> {
        if e.kind.kind != self.kind.kind {
            return None;
        }
        let now = self.matches(&e.object);
        match e.ty {
            EventType::Added => now.then_some(("ADDED", &*e.object)),
            EventType::Deleted => now.then_some(("DELETED", &*e.object)),
            EventType::Modified => {
                let before = e.prev.as_deref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", &*e.object)),
                    (false, true) => Some(("ADDED", &*e.object)),
                    (true, false) => Some(("DELETED", &*e.object)),
                    (false, false) => None,
                }
            }
        }
    }
}

fn parse_filter(
    kind: &'static ResourceKind,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(
        q.get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Filter {
        kind,
        ns,
        labels,
        fields,
    })
}

impl Api {
    /// Handles one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path().to_string();
        let public = matches!(
            path.as_str(),
            "/healthz" | "/readyz" | "/livez" | "/version"
        );
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !public && !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                return Ok(error_response(&ApiError::unauthorized()));
            }
        }
        Ok(match self.dispatch(req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        })
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let q = parse_query(req.uri().query());
        let method = req.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz" | "/readyz" | "/livez") => {
                return Ok(full(StatusCode::OK, "text/plain", b"ok".to_vec()))
            }
            (Method::GET, "/version") => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"major": "1", "minor": "32", "gitVersion": format!("v1.32.0+weir-{}", env!("CARGO_PKG_VERSION")), "platform": "linux/amd64"}),
                ))
            }
            (Method::GET, "/api") => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
                ))
            }
            (Method::GET, "/apis") => {
                return Ok(json_response(
                    StatusCode::OK,
                    &discovery_groups(&self.runtime_config),
                ))
            }
            (Method::GET, "/openapi/v2") => {
                return Ok(full(StatusCode::OK, "application/octet-stream", Vec::new()))
            }
            _ => {}
        }
        if method == Method::GET {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let doc = match segs.as_slice() {
                ["api", v] => discovery_resources(&self.runtime_config, "", v),
                ["apis", g, v] => discovery_resources(&self.runtime_config, g, v),
                ["apis", g] => discovery_groups(&self.runtime_config)["groups"]
                    .as_array()
                    .and_then(|gs| gs.iter().find(|x| x["name"] == *g).cloned())
                    .map(|mut g| {
                        g["kind"] = json!("APIGroup");
                        g["apiVersion"] = json!("v1");
                        g
                    }),
                _ => None,
            };
            if let Some(doc) = doc {
                return Ok(json_response(StatusCode::OK, &doc));
            }
        }
        let t = route(&path)?;
        if !self.runtime_config.serves(t.kind) {
            return Err(ApiError::no_route(&path));
        }
        let accept = header(&req, "accept");
        let content_type = header(&req, "content-type");
        if content_type.contains("protobuf") {
            return Err(ApiError::unsupported_protobuf());
        }
        let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
        let opts = WriteOpts { dry_run };
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?
            .to_bytes();
        let store = self.store.clone();
        let kind = t.kind;
        let ns = t.ns.clone();
        match (method, t.name.clone()) {
            (Method::GET, None) => {
                if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return self.watch(kind, ns, &q, wants_table(&accept));
                }
                self.list(kind, ns, &q, wants_table(&accept))
            }
            (Method::GET, Some(name)) => {
                let obj = store
                    .get(kind, ns.as_deref(), &name)
                    .ok_or_else(|| ApiError::not_found(kind.plural, &name))?;
                if wants_table(&accept) {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    return Ok(json_response(
                        StatusCode::OK,
                        &table(kind, &[obj], &rv, true),
                    ));
                }
                Ok(json_response(StatusCode::OK, &in_version(kind, &obj)))
            }
            (Method::POST, None) => {
                let v: Value = parse_json(&body)?;
                let ns = ns.clone();
                let obj = blocking(move || store.create(kind, ns.as_deref(), v, opts)).await?;
                Ok(json_response(StatusCode::CREATED, &in_version(kind, &obj)))
            }
            (Method::PUT, Some(name)) => {
                let v: Value = parse_json(&body)?;
                let status_only = t.sub.is_some();
                let obj = blocking(move || {
                    store.update(kind, ns.as_deref(), &name, v, status_only, opts)
                })
                .await?;
                Ok(json_response(StatusCode::OK, &in_version(kind, &obj)))
            }
            (Method::PATCH, Some(name)) => {
                let pt = PatchType::from_content_type(&content_type)?;
                let status_only = t.sub.is_some();
                let (obj, created) = blocking(move || {
                    store.patch(kind, ns.as_deref(), &name, pt, &body, status_only, opts)
                })
                .await?;
                Ok(json_response(
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &in_version(kind, &obj),
                ))
            }
            (Method::DELETE, Some(name)) => {
                let mut d = delete_opts(&body, &q)?;
                d.dry_run |= dry_run;
                let obj = blocking(move || store.delete(kind, ns.as_deref(), &name, &d)).await?;
                Ok(json_response(StatusCode::OK, &in_version(kind, &obj)))
            }
            (Method::DELETE, None) => {
                let filter = parse_filter(kind, ns.clone(), &q)?;
                let mut d = delete_opts(&body, &q)?;
                d.dry_run |= dry_run;
                let (objs, rv) = store.list(kind, ns.as_deref());
                let mut deleted = Vec::new();
                for o in objs.iter().filter(|o| filter.matches(o)) {
                    let name = o
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let ons = o
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .map(String::from);
                    let (s, d2) = (store.clone(), d.clone());
                    match blocking(move || s.delete(kind, ons.as_deref(), &name, &d2)).await {
                        Ok(v) => deleted.push(in_version(kind, &v).into_owned()),
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
                ))
            }
            (m, _) => Err(ApiError::method_not_allowed(m.as_str())),
        }
    }

    fn list(
        &self,
        kind: &'static ResourceKind,
        ns: Option<String>,
        q: &HashMap<String, String>,
        as_table: bool,
    ) -> Result<Response<Body>, ApiError> {
        let filter = parse_filter(kind, ns.clone(), q)?;
        let (objs, rev) = self.store.list(kind, ns.as_deref());
        // Continue tokens are `<rv>/<namespace>/<name>` of the last item returned: later pages
        // continue after that key and report the first page's resourceVersion.
        let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
            Some(c) => {
                let mut parts = c.splitn(3, '/');
                let rv = parts.next().unwrap_or_default().to_string();
                let after = (
                    parts.next().unwrap_or_default().to_string(),
                    parts.next().unwrap_or_default().to_string(),
                );
                (rv, Some(after))
            }
            None => (rev.to_string(), None),
        };
        let limit: usize = q
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let key = weir_model::namespaced_name;
        let mut items: Vec<Arc<Value>> = Vec::new();
        let mut cont = String::new();
        for o in objs
            .iter()
            .filter(|o| after.as_ref().is_none_or(|a| key(o) > *a))
            .filter(|o| filter.matches(o))
        {
            if items.len() == limit {
                let (n, name) = key(items.last().expect("non-empty"));
                cont = format!("{list_rv}/{n}/{name}");
                break;
            }
            items.push(o.clone());
        }
        if as_table {
            let mut t = table(kind, &items, &list_rv, true);
            if !cont.is_empty() {
                t["metadata"]["continue"] = json!(cont);
            }
            return Ok(json_response(StatusCode::OK, &t));
        }
        let mut meta = json!({"resourceVersion": list_rv});
        if !cont.is_empty() {
            meta["continue"] = json!(cont);
        }
        let body = json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": meta, "items": items.iter().map(|o| in_version(kind, o)).collect::<Vec<_>>()});
        Ok(json_response(StatusCode::OK, &body))
    }

    fn watch(
        &self,
        kind: &'static ResourceKind,
        ns: Option<String>,
        q: &HashMap<String, String>,
        as_table: bool,
    ) -> Result<Response<Body>, ApiError> {
        let filter = parse_filter(kind, ns, q)?;
        let rv = q
            .get("resourceVersion")
            .map(String::as_str)
            .unwrap_or_default();
        let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
        let from = match rv {
            "" | "0" => None,
            _ if send_initial => None,
            r => Some(
                r.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {r:?}")))?,
            ),
        };
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs);
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let started = self.store.watch(kind, from);
        let interval = self.bookmark_interval;
        tokio::spawn(async move {
            let mut first = true;
            let mut line = |ty: &str, obj: &Value| -> Bytes {
                let obj = if as_table && ty != "BOOKMARK" && ty != "ERROR" {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let t = table(filter.kind, &[Arc::new(obj.clone())], &rv, first);
                    first = false;
                    Cow::Owned(t)
                } else if ty != "BOOKMARK" && ty != "ERROR" {
                    in_version(filter.kind, obj)
                } else {
                    Cow::Borrowed(obj)
                };
                let mut b = serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("json");
                b.push(b'\n');
                Bytes::from(b)
            };
            let bookmark = |rev: u64, end: bool| {
                let mut meta = json!({"resourceVersion": rev.to_string()});
                if end {
                    meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                json!({"kind": filter.kind.kind, "apiVersion": filter.kind.api_version(), "metadata": meta})
            };
            let (start, mut events, mut last) = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(line("ERROR", &e.to_status())).await;
                    return;
                }
            };
            match start {
                WatchStart::Snapshot(objs, rev) => {
                    for o in objs.iter().filter(|o| filter.matches(o)) {
                        if tx.send(line("ADDED", o)).await.is_err() {
                            return;
                        }
                    }
                    last = rev;
                    if send_initial
                        && bookmarks
                        && tx
                            .send(line("BOOKMARK", &bookmark(rev, true)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                WatchStart::Backlog(evs) => {
                    for e in evs {
                        if let Some((ty, o)) = filter.view(&e) {
                            if tx.send(line(ty, o)).await.is_err() {
                                return;
                            }
                        }
                        last = e.rev;
                    }
                }
            }
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                let sleep_until = deadline.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
                });
                tokio::select! {
                    r = events.recv() => match r {
                        Ok(e) => {
                            if e.rev <= last {
                                continue;
                            }
                            last = e.rev;
                            if let Some((ty, o)) = filter.view(&e) {
                                if tx.send(line(ty, o)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // This watcher fell too far behind: it must relist, as after a
                            // compaction.
                            let _ = tx.send(line("ERROR", &ApiError::expired(last, last + 1).to_status())).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => {
                        if bookmarks && tx.send(line("BOOKMARK", &bookmark(last, false))).await.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(sleep_until) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("transfer-encoding", "chunked")
            .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
            .expect("response"))
    }
}

/// A request header as a string ("" when absent or not text).
fn header<B>(req: &Request<B>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
}

fn delete_opts(body: &[u8], q: &HashMap<String, String>) -> Result<DeleteOpts, ApiError> {
    let mut d = DeleteOpts::default();
    if !body.is_empty() {
        let v: Value = parse_json(body)?;
        d.grace_period = v.get("gracePeriodSeconds").and_then(Value::as_i64);
        d.precondition_rv = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
        d.precondition_uid = v
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from);
        d.dry_run = v
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    }
    if let Some(g) = q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()) {
        d.grace_period = Some(g);
    }
    Ok(d)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let t = route("/api/v1/namespaces/x/pods/p/status").unwrap();
        assert_eq!(
            (
                t.kind.kind,
                t.ns.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("Pod", Some("x"), Some("p"), Some("status"))
        );
        let t = route("/api/v1/namespaces/x").unwrap();
        assert_eq!((t.kind.kind, t.name.as_deref()), ("Namespace", Some("x")));
        let t = route("/api/v1/namespaces/x/status").unwrap();
        assert_eq!(
            (t.kind.kind, t.sub.as_deref()),
            ("Namespace", Some("status"))
        );
        let t = route("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!((t.kind.kind, t.ns), ("EndpointSlice", None));
        assert!(route("/api/v1/namespaces/x/nodes/n").is_err());
        assert!(route("/apis/apps/v1/namespaces/x/deployments").is_err());
    }

    #[test]
    fn query() {
        let q = parse_query(Some("&labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
    }
}
