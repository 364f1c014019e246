//! API errors, answered as Kubernetes `Status` objects.

use serde_json::{json, Value};
use weir_model::ValidationError;

/// A failed API request: HTTP code, Kubernetes reason and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Kubernetes reason, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human-readable message naming the object.
    pub message: String,
    /// `details` of the Status (name, kind, causes).
    pub details: Value,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String, details: Value) -> Self {
        ApiError {
            code,
            reason,
            message,
            details,
        }
    }

    /// 404: `pods "p" not found`.
    pub fn not_found(plural: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{plural} {name:?} not found"),
            json!({"name": name, "kind": plural}),
        )
    }

    /// 404 for a path or resource the server does not serve.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
            json!({}),
        )
    }

    /// 409 AlreadyExists.
    pub fn already_exists(plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{plural} {name:?} already exists"),
            json!({"name": name, "kind": plural}),
        )
    }

    /// 409 Conflict for a stale resourceVersion.
    pub fn conflict(plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {plural} {name:?}: the object has been modified; please apply your changes to the latest version and try again"),
            json!({"name": name, "kind": plural}),
        )
    }

    /// 422 Invalid, with one cause per field. `details.kind` is the Kind (as kube-apiserver
    /// sends it for Invalid), which kubectl prints as `The Service "x" is invalid: ...`.
    pub fn invalid(group: &str, err: &ValidationError) -> Self {
        let causes: Vec<Value> = err
            .causes
            .iter()
            .map(|c| json!({"reason": c.reason(), "message": c.detail(), "field": c.field}))
            .collect();
        Self::new(
            422,
            "Invalid",
            err.to_string(),
            json!({"name": err.name, "kind": err.kind, "group": group, "causes": causes}),
        )
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), json!({}))
    }

    /// 401 Unauthorized.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into(), json!({}))
    }

    /// 403 Forbidden.
    pub fn forbidden(plural: &str, name: &str, message: impl Into<String>) -> Self {
        Self::new(
            403,
            "Forbidden",
            message.into(),
            json!({"name": name, "kind": plural}),
        )
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            json!({}),
        )
    }

    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(ct: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"),
            json!({}),
        )
    }

    /// 415 for protobuf bodies: this server speaks JSON only.
    pub fn unsupported_protobuf() -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            "weir's API server accepts JSON (and YAML for server-side apply), not protobuf: kubectl commands that build objects themselves (create service|deployment, run, expose) send protobuf; write a manifest and use `kubectl create -f` or `kubectl apply -f` instead".into(),
            json!({}),
        )
    }

    /// 410 Expired: the requested resourceVersion has been compacted.
    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
            json!({}),
        )
    }

    /// 500 InternalError.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message.into(), json!({}))
    }

    /// The Status object for this error.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        })
    }
}
