//! Kubernetes clients (kube-rs) for the lab's components and the CLI, and a kubectl-like
//! apply/delete of manifests over the dynamic API.

use std::path::Path;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use kube::Client;
use serde_json::Value;
use weir_model::ResourceKind;

use crate::LabError;

/// A client for the cluster of `kubeconfig`.
pub async fn client_from_kubeconfig(kubeconfig: &Path) -> Result<Client, LabError> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| LabError::Kube(format!("reading {}: {e}", kubeconfig.display())))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| LabError::Kube(format!("loading {}: {e}", kubeconfig.display())))?;
    Client::try_from(cfg).map_err(|e| LabError::Kube(e.to_string()))
}

/// The kube-rs dynamic resource description of a weir kind.
pub fn api_resource(kind: &ResourceKind) -> ApiResource {
    weir_agent::api_resource(kind)
}

/// A dynamic API for `kind` in `ns` (ignored for cluster-scoped kinds).
pub fn dynamic_api(client: &Client, kind: &ResourceKind, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match (kind.namespaced, ns) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        (true, None) => Api::default_namespaced_with(client.clone(), &ar),
        (false, _) => Api::all_with(client.clone(), &ar),
    }
}

/// A manifest document resolved to its kind and target.
#[derive(Debug, Clone)]
pub struct Doc {
    /// Where it came from (`file: document N`).
    pub origin: String,
    /// Its kind.
    pub kind: &'static ResourceKind,
    /// Namespace (for namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The object.
    pub object: Value,
}

/// Reads manifests from files, directories (their .yaml/.yml/.json files, sorted) or `-`.
pub fn read_manifests(sources: &[String], default_ns: &str) -> Result<Vec<Doc>, LabError> {
    let mut files: Vec<(String, String)> = Vec::new();
    for s in sources {
        if s == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| LabError::io("-".into(), e))?;
            files.push(("-".into(), text));
            continue;
        }
        let p = Path::new(s);
        if p.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| LabError::io(p.to_path_buf(), e))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            entries.sort();
            for f in entries {
                let text = std::fs::read_to_string(&f).map_err(|e| LabError::io(f.clone(), e))?;
                files.push((f.display().to_string(), text));
            }
        } else {
            let text = std::fs::read_to_string(p).map_err(|e| LabError::io(p.to_path_buf(), e))?;
            files.push((s.clone(), text));
        }
    }
    let mut docs = Vec::new();
    for (name, text) in files {
        let values = weir_model::manifest::parse_documents(&name, &text)
            .map_err(|e| LabError::Manifest(e.to_string()))?;
        for (i, v) in values.into_iter().enumerate() {
            let origin = format!("{name}: document {}", i + 1);
            let kind = weir_model::validate::kind_of(&v)
                .map_err(|e| LabError::Manifest(format!("{origin}: {e}")))?;
            let meta_name = v
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if meta_name.is_empty() {
                return Err(LabError::Manifest(format!(
                    "{origin}: {} has no metadata.name",
                    kind.kind
                )));
            }
            let namespace = kind.namespaced.then(|| {
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(default_ns)
                    .to_string()
            });
            docs.push(Doc {
                origin,
                kind,
                namespace,
                name: meta_name,
                object: v,
            });
        }
    }
    Ok(docs)
}

fn api_error(doc: &Doc, e: kube::Error) -> LabError {
    let msg = match &e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    };
    if msg.contains(&format!("{:?}", doc.name)) {
        LabError::Apply(format!("{}: {msg}", doc.origin))
    } else {
        LabError::Apply(format!(
            "{}: {} {:?}: {msg}",
            doc.origin, doc.kind.kind, doc.name
        ))
    }
}

/// Applies documents as `kubectl apply --server-side` does. Every document is first sent
/// as a server-side dry run, and nothing is written unless all of them pass. Namespaces are
/// applied first, so a file may create a namespace and its contents. Returns one line per
/// document (`service/web configured`).
pub async fn apply(client: &Client, docs: &[Doc]) -> Result<Vec<String>, LabError> {
    let mut ordered: Vec<&Doc> = docs.iter().collect();
    ordered.sort_by_key(|d| if d.kind.kind == "Namespace" { 0 } else { 1 });
    let pp = PatchParams::apply("weir").force();
    let mut dry = pp.clone();
    dry.dry_run = true;
    // A dry run of an object in a namespace that the same apply creates would fail with
    // NotFound; such documents are checked after their namespace exists.
    let new_namespaces: Vec<&str> = ordered
        .iter()
        .filter(|d| d.kind.kind == "Namespace")
        .map(|d| d.name.as_str())
        .collect();
    let mut deferred = Vec::new();
    for d in &ordered {
        let api = dynamic_api(client, d.kind, d.namespace.as_deref());
        match api.patch(&d.name, &dry, &Patch::Apply(&d.object)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s))
                if s.code == 404
                    && d.namespace
                        .as_deref()
                        .is_some_and(|n| new_namespaces.contains(&n)) =>
            {
                deferred.push(*d);
            }
            Err(e) => return Err(api_error(d, e)),
        }
    }
    let mut out = Vec::new();
    for d in ordered.iter().filter(|d| d.kind.kind == "Namespace") {
        out.push(apply_one(client, d, &pp).await?);
    }
    for d in &deferred {
        let api = dynamic_api(client, d.kind, d.namespace.as_deref());
        api.patch(&d.name, &dry, &Patch::Apply(&d.object))
            .await
            .map_err(|e| api_error(d, e))?;
    }
    for d in ordered.iter().filter(|d| d.kind.kind != "Namespace") {
        out.push(apply_one(client, d, &pp).await?);
    }
    Ok(out)
}

async fn apply_one(client: &Client, d: &Doc, pp: &PatchParams) -> Result<String, LabError> {
    let api = dynamic_api(client, d.kind, d.namespace.as_deref());
    let before = api.get_opt(&d.name).await.map_err(|e| api_error(d, e))?;
    let after = api
        .patch(&d.name, pp, &Patch::Apply(&d.object))
        .await
        .map_err(|e| api_error(d, e))?;
    let verb = match before {
        None => "created",
        Some(b) if b.metadata.resource_version == after.metadata.resource_version => "unchanged",
        Some(_) => "configured",
    };
    Ok(format!("{}/{} {verb}", d.kind.singular, d.name))
}

/// Deletes the objects named by documents (as `kubectl delete -f`). With `ignore_missing`,
/// objects already gone are not an error.
pub async fn delete(
    client: &Client,
    docs: &[Doc],
    ignore_missing: bool,
) -> Result<Vec<String>, LabError> {
    let mut out = Vec::new();
    for d in docs.iter().rev() {
        let api = dynamic_api(client, d.kind, d.namespace.as_deref());
        match api.delete(&d.name, &DeleteParams::default()).await {
            Ok(_) => out.push(format!("{}/{} deleted", d.kind.singular, d.name)),
            Err(kube::Error::Api(s)) if s.code == 404 && ignore_missing => {}
            Err(e) => return Err(api_error(d, e)),
        }
    }
    Ok(out)
}
