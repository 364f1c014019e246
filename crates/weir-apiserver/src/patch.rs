//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch (the subset kubectl's
//! client-side apply and `kubectl patch` send), JSON patch (RFC 6902) and server-side apply.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The patch formats of `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/json-patch+json`
    Json,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
}

impl PatchType {
    /// The patch type of a `Content-Type` header value.
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            _ => Err(ApiError::unsupported_media_type(ct)),
        }
    }
}

/// Parses a patch body: JSON, or YAML for server-side apply.
pub fn parse_body(pt: PatchType, body: &[u8]) -> Result<Value, ApiError> {
    match pt {
        PatchType::Apply => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}"))),
    }
}

/// Applies `patch` of type `pt` to `target`.
pub fn apply(pt: PatchType, target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match pt {
        PatchType::Merge | PatchType::Apply => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Strategic => {
            strategic_merge(target, patch, "");
            Ok(())
        }
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &p).map_err(|e| ApiError::new_invalid_patch(e.to_string()))
        }
    }
}

impl ApiError {
    fn new_invalid_patch(msg: String) -> Self {
        let mut e = ApiError::bad_request(format!("the JSON patch could not be applied: {msg}"));
        e.code = 422;
        e.reason = "Invalid";
        e
    }
}

/// The merge key of a list field under `path` (a dotted path without indexes), as in the
/// Kubernetes types' `patchMergeKey` tags. Lists without one are replaced whole.
fn merge_key(path: &str) -> Option<&'static str> {
    let last = path.rsplit('.').next().unwrap_or(path);
    match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "readinessGates" => Some(match last {
            "readinessGates" => "conditionType",
            _ => "name",
        }),
        "volumeMounts" => Some("mountPath"),
        "conditions" => Some("type"),
        "ports" if path.contains("containers") => Some("containerPort"),
        "ports" if path == ".spec.ports" => Some("port"),
        "ownerReferences" => Some("uid"),
        _ => None,
    }
}

fn strategic_merge(target: &mut Value, patch: &Value, path: &str) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut m = pm.clone();
        m.remove("$patch");
        *target = Value::Object(m);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let tm = target.as_object_mut().expect("object");
    for (k, v) in pm {
        if k == "$patch" || k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(del)) = (
                tm.get_mut(field).and_then(Value::as_array_mut),
                v.as_array(),
            ) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        let child_path = format!("{path}.{k}");
        match v {
            Value::Null => {
                tm.remove(k);
            }
            Value::Object(o) if o.get("$patch").and_then(Value::as_str) == Some("delete") => {
                tm.remove(k);
            }
            Value::Object(_) => {
                let entry = tm.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(entry, v, &child_path);
            }
            Value::Array(items) => match (merge_key(&child_path), tm.get_mut(k)) {
                (Some(key), Some(Value::Array(existing))) => {
                    for item in items {
                        let id = item.get(key).cloned();
                        let pos = id
                            .as_ref()
                            .and_then(|id| existing.iter().position(|e| e.get(key) == Some(id)));
                        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                        match (pos, delete) {
                            (Some(i), true) => {
                                existing.remove(i);
                            }
                            (Some(i), false) => {
                                strategic_merge(&mut existing[i], item, &child_path)
                            }
                            (None, true) => {}
                            (None, false) => {
                                let mut fresh = Value::Null;
                                strategic_merge(&mut fresh, item, &child_path);
                                existing.push(fresh);
                            }
                        }
                    }
                }
                _ => {
                    let cleaned: Vec<Value> = items
                        .iter()
                        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                        .map(|i| {
                            let mut fresh = Value::Null;
                            strategic_merge(&mut fresh, i, &child_path);
                            fresh
                        })
                        .collect();
                    tm.insert(k.clone(), Value::Array(cleaned));
                }
            },
            other => {
                tm.insert(k.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_lists_by_key() {
        let mut pod = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [
            {"name": "c1", "image": "x", "ports": [{"containerPort": 80, "name": "http"}]},
            {"name": "c2", "image": "y"}]}});
        let patch = json!({"metadata": {"labels": {"a": null, "b": "2"}},
            "spec": {"$setElementOrder/containers": [{"name": "c1"}, {"name": "c2"}],
                     "containers": [{"name": "c2", "image": "z"}, {"name": "c3", "image": "w"}]}});
        apply(PatchType::Strategic, &mut pod, &patch).unwrap();
        assert_eq!(pod["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(pod["spec"]["containers"][1]["image"], "z");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(pod["spec"]["containers"][2]["name"], "c3");
    }

    #[test]
    fn json_and_merge_patch() {
        let mut v = json!({"a": {"b": 1}, "l": [1, 2]});
        apply(PatchType::Merge, &mut v, &json!({"a": {"c": 2}, "l": [3]})).unwrap();
        assert_eq!(v, json!({"a": {"b": 1, "c": 2}, "l": [3]}));
        apply(
            PatchType::Json,
            &mut v,
            &json!([{"op": "remove", "path": "/a/b"}]),
        )
        .unwrap();
        assert_eq!(v["a"], json!({"c": 2}));
        assert_eq!(
            apply(
                PatchType::Json,
                &mut v,
                &json!([{"op": "remove", "path": "/zz"}])
            )
            .unwrap_err()
            .code,
            422
        );
        assert!(PatchType::from_content_type("text/plain").is_err());
    }
}
