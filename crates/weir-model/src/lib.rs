//! weir's model of the Kubernetes API: the kinds it serves, their defaults and validation
//! (with Kubernetes-style messages), label and field selectors, manifest reading and the
//! table columns used to print objects.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod defaults;
pub mod endpoint;
pub mod kinds;
pub mod manifest;
pub mod print;
pub mod selector;
pub mod strategy;
pub mod validate;

pub use kinds::ResourceKind;
pub use selector::{FieldSelector, LabelSelector};
pub use validate::{FieldError, ValidationError};

/// An object's `(metadata.namespace, metadata.name)`, empty strings for what it lacks.
pub fn namespaced_name(o: &serde_json::Value) -> (String, String) {
    let at = |p: &str| {
        o.pointer(p)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (at("/metadata/namespace"), at("/metadata/name"))
}

/// The current time in the RFC 3339 form Kubernetes uses (`2026-01-02T03:04:05Z`).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
