//! Validation of API objects with Kubernetes-style messages that name the object and field,
//! e.g. `Service "web" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1
//! and 65535, inclusive`.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use crate::kinds::{self, ResourceKind};

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldErrorType {
    /// The field is required and missing.
    Required,
    /// The value is not valid; the message says why.
    Invalid(Value, String),
    /// The value repeats one that must be unique.
    Duplicate(Value),
    /// The value is not one of the supported values.
    NotSupported(Value, Vec<&'static str>),
    /// The change or combination is not allowed.
    Forbidden(String),
    /// A list has more items than allowed (its length, the most allowed).
    TooMany(usize, usize),
}

/// One invalid field, with its path in the object (`spec.ports[0].port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Field path, dotted with `[i]` indexes.
    pub field: String,
    /// What is wrong.
    pub kind: FieldErrorType,
}

impl FieldError {
    /// Kubernetes' reason string for `details.causes[].reason`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorType::Required => "FieldValueRequired",
            FieldErrorType::Invalid(..) => "FieldValueInvalid",
            FieldErrorType::Duplicate(_) => "FieldValueDuplicate",
            FieldErrorType::NotSupported(..) => "FieldValueNotSupported",
            FieldErrorType::Forbidden(_) => "FieldValueForbidden",
            FieldErrorType::TooMany(..) => "FieldValueTooMany",
        }
    }

    /// The message without the field path.
    pub fn detail(&self) -> String {
        match &self.kind {
            FieldErrorType::Required => "Required value".to_string(),
            FieldErrorType::Invalid(v, m) => format!("Invalid value: {}: {}", show(v), m),
            FieldErrorType::Duplicate(v) => format!("Duplicate value: {}", show(v)),
            FieldErrorType::NotSupported(v, allowed) => format!(
                "Unsupported value: {}: supported values: {}",
                show(v),
                allowed
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FieldErrorType::Forbidden(m) => format!("Forbidden: {m}"),
            FieldErrorType::TooMany(n, max) => {
                format!("Too many: {n}: must have at most {max} items")
            }
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.detail())
    }
}

/// An object failed validation: the Kubernetes `Invalid` (422) error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Kind of the object, e.g. `Service`.
    pub kind: String,
    /// Name of the object (may be empty when only generateName was given).
    pub name: String,
    /// Every invalid field found.
    pub causes: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid: ", self.kind, self.name)?;
        if self.causes.len() == 1 {
            write!(f, "{}", self.causes[0])
        } else {
            let all: Vec<String> = self.causes.iter().map(|c| c.to_string()).collect();
            write!(f, "[{}]", all.join(", "))
        }
    }
}

impl std::error::Error for ValidationError {}

mod mcs;
mod traffic;
pub use traffic::{duration_ms, MAX_LEVELS};

/// Collects field errors while walking an object.
#[derive(Default)]
struct Errs(Vec<FieldError>);

impl Errs {
    fn required(&mut self, field: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            kind: FieldErrorType::Required,
        });
    }
    fn invalid(&mut self, field: impl Into<String>, v: impl Into<Value>, msg: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            kind: FieldErrorType::Invalid(v.into(), msg.into()),
        });
    }
    fn duplicate(&mut self, field: impl Into<String>, v: impl Into<Value>) {
        self.0.push(FieldError {
            field: field.into(),
            kind: FieldErrorType::Duplicate(v.into()),
        });
    }
    fn not_supported(&mut self, field: impl Into<String>, v: &str, allowed: &[&'static str]) {
        self.0.push(FieldError {
            field: field.into(),
            kind: FieldErrorType::NotSupported(Value::String(v.to_string()), allowed.to_vec()),
        });
    }
    fn forbidden(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            kind: FieldErrorType::Forbidden(msg.into()),
        });
    }
    fn one_of(&mut self, field: &str, v: Option<&str>, allowed: &[&'static str]) {
        if let Some(v) = v {
            if !allowed.contains(&v) {
                self.not_supported(field, v, allowed);
            }
        }
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

/// Why `s` is not an RFC 1123 label, if it is not one.
pub fn dns1123_label_problem(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    (!ok).then(|| DNS1123_LABEL_MSG.to_string())
}

/// Why `s` is not an RFC 1123 subdomain, if it is not one.
pub fn dns1123_subdomain_problem(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    (!ok).then(|| DNS1123_SUBDOMAIN_MSG.to_string())
}

/// Why `s` is not an RFC 1035 label (Service names), if it is not one.
pub fn dns1035_label_problem(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok = s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && dns1123_label_problem(s).is_none();
    (!ok).then(|| DNS1035_LABEL_MSG.to_string())
}

/// Why `s` is not an IANA service name (named ports), if it is not one.
pub fn iana_svc_name_problem(s: &str) -> Option<String> {
    if s.len() > 15 {
        return Some("must be no more than 15 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into(),
        );
    }
    if s.contains("--") {
        return Some("must not contain consecutive hyphens".into());
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some("must contain at least one letter (a-z)".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must not begin or end with a hyphen".into());
    }
    None
}

fn qualified_name_problem(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    (!ok).then(|| "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and be at most 63 characters".to_string())
}

/// Why `key` is not a valid label key (`[prefix/]name`), if it is not one.
pub fn label_key_problem(key: &str) -> Option<String> {
    match key.split_once('/') {
        Some((prefix, name)) => dns1123_subdomain_problem(prefix)
            .map(|p| format!("prefix part {p}"))
            .or_else(|| qualified_name_problem(name)),
        None => qualified_name_problem(key),
    }
}

/// Why `v` is not a valid label value, if it is not one.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    qualified_name_problem(v).map(|_| "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?') and be at most 63 characters".to_string())
}

/// Parses a CIDR in canonical form (`10.0.0.0/8`, not `10.0.0.1/8`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| {
        "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)".to_string()
    })?;
    if net.network() != net.addr() {
        return Err(format!(
            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64); did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn arr_at<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

/// Validates an object of `kind` (already defaulted); `old` is the stored object on update.
/// Checks the structure against the Kubernetes types first, then each kind's rules.
pub fn validate(
    kind: &ResourceKind,
    obj: &Value,
    old: Option<&Value>,
) -> Result<(), ValidationError> {
    let mut e = Errs::default();
    check_typed(kind, obj, &mut e);
    if e.0.is_empty() {
        validate_metadata(kind, obj, old, &mut e);
        match kind.kind {
            "Namespace" => validate_namespace(obj, &mut e),
            "Pod" => validate_pod(obj, old, &mut e),
            "Service" => validate_service(obj, old, &mut e),
            "Node" => validate_node(obj, &mut e),
            "EndpointSlice" => validate_endpoint_slice(obj, old, &mut e),
            "NetworkPolicy" => validate_network_policy(obj, &mut e),
            "SecurityIdentity" => validate_security_identity(obj, &mut e),
            "RemoteEndpoint" => validate_remote_endpoint(obj, &mut e),
            "RemoteNode" => validate_remote_node(obj, &mut e),
            "ServiceExport" => mcs::validate_service_export(obj, &mut e),
            "ServiceImport" => mcs::validate_service_import(obj, &mut e),
            "ClusterProperty" => mcs::validate_cluster_property(obj, &mut e),
            "GlobalTrafficPolicy" => traffic::validate_global_traffic_policy(obj, &mut e),
            _ => {}
        }
    }
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationError {
            kind: kind.kind.to_string(),
            name: str_at(obj, "/metadata/name")
                .unwrap_or_default()
                .to_string(),
            causes: e.0,
        })
    }
}

fn check_typed(kind: &ResourceKind, obj: &Value, e: &mut Errs) {
    use k8s_openapi::api::{core::v1, discovery::v1 as disc, networking::v1 as net};
    fn check<T: serde::de::DeserializeOwned>(obj: &Value, e: &mut Errs) {
        let text = obj.to_string();
        let de = &mut serde_json::Deserializer::from_str(&text);
        if let Err(err) = serde_path_to_error::deserialize::<_, T>(de) {
            let path = err.path().to_string();
            let inner = err.into_inner().to_string();
            let msg = inner
                .split(" at line ")
                .next()
                .unwrap_or(&inner)
                .to_string();
            let field = if path == "." {
                "<root>".to_string()
            } else {
                path
            };
            let value = obj
                .pointer(&format!(
                    "/{}",
                    field.replace(['.', '['], "/").replace(']', "")
                ))
                .cloned()
                .unwrap_or(Value::Null);
            e.invalid(field, value, msg);
        }
    }
    match kind.kind {
        "Namespace" => check::<v1::Namespace>(obj, e),
        "Pod" => check::<v1::Pod>(obj, e),
        "Service" => check::<v1::Service>(obj, e),
        "Node" => check::<v1::Node>(obj, e),
        "EndpointSlice" => check::<disc::EndpointSlice>(obj, e),
        "NetworkPolicy" => check::<net::NetworkPolicy>(obj, e),
        _ => {}
    }
}

fn validate_metadata(kind: &ResourceKind, obj: &Value, old: Option<&Value>, e: &mut Errs) {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    if name.is_empty() {
        e.required("metadata.name");
    } else {
        let problem = match kind.kind {
            "Namespace" => dns1123_label_problem(name),
            "Service" => dns1035_label_problem(name),
            _ => dns1123_subdomain_problem(name),
        };
        if let Some(p) = problem {
            e.invalid("metadata.name", name, p);
        }
    }
    if kind.namespaced
        && str_at(obj, "/metadata/namespace")
            .unwrap_or_default()
            .is_empty()
    {
        e.required("metadata.namespace");
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(p) = label_key_problem(k) {
                e.invalid("metadata.labels", k.as_str(), p);
            }
            if let Some(p) = v.as_str().and_then(label_value_problem) {
                e.invalid(format!("metadata.labels[{k}]"), v.clone(), p);
            }
        }
    }
    if let Some(old) = old {
        for f in ["name", "namespace", "uid"] {
            let (a, b) = (
                str_at(obj, &format!("/metadata/{f}")),
                str_at(old, &format!("/metadata/{f}")),
            );
            if f == "uid" && a.is_none() {
                continue;
            }
            if a != b {
                e.invalid(
                    format!("metadata.{f}"),
                    a.unwrap_or_default(),
                    "field is immutable",
                );
            }
        }
    }
}

fn validate_namespace(obj: &Value, e: &mut Errs) {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    let label = obj.pointer("/metadata/labels/kubernetes.io~1metadata.name");
    if label.and_then(Value::as_str) != Some(name) {
        e.invalid(
            "metadata.labels[kubernetes.io/metadata.name]",
            label.cloned().unwrap_or(Value::Null),
            format!("must be {name:?}: the label is set by the API server and cannot be changed"),
        );
    }
}

fn check_port_number(e: &mut Errs, field: String, v: &Value) {
    match v.as_i64() {
        Some(p) if (1..=65535).contains(&p) => {}
        _ => e.invalid(field, v.clone(), "must be between 1 and 65535, inclusive"),
    }
}

/// A targetPort / NetworkPolicy port: a number 1..65535 or an IANA service name.
fn check_int_or_name(e: &mut Errs, field: String, v: &Value) {
    match v {
        Value::String(s) => {
            if let Some(p) = iana_svc_name_problem(s) {
                e.invalid(field, v.clone(), p)
            }
        }
        _ => check_port_number(e, field, v),
    }
}

fn validate_pod(obj: &Value, old: Option<&Value>, e: &mut Errs) {
    let containers = arr_at(obj, "/spec/containers");
    if containers.is_empty() {
        e.required("spec.containers");
    }
    let mut names = HashSet::new();
    let mut port_names = HashSet::new();
    for (i, c) in containers.iter().enumerate() {
        let f = format!("spec.containers[{i}]");
        match str_at(c, "/name") {
            None | Some("") => e.required(format!("{f}.name")),
            Some(n) => {
                if let Some(p) = dns1123_label_problem(n) {
                    e.invalid(format!("{f}.name"), n, p);
                } else if !names.insert(n.to_string()) {
                    e.duplicate(format!("{f}.name"), n);
                }
            }
        }
        if str_at(c, "/image").unwrap_or_default().is_empty() {
            e.required(format!("{f}.image"));
        }
        for (j, p) in arr_at(c, "/ports").iter().enumerate() {
            let pf = format!("{f}.ports[{j}]");
            match p.get("containerPort") {
                None => e.required(format!("{pf}.containerPort")),
                Some(v) => check_port_number(e, format!("{pf}.containerPort"), v),
            }
            if let Some(n) = str_at(p, "/name") {
                if let Some(problem) = iana_svc_name_problem(n) {
                    e.invalid(format!("{pf}.name"), n, problem);
                } else if !port_names.insert(n.to_string()) {
                    e.duplicate(format!("{pf}.name"), n);
                }
            }
            e.one_of(&format!("{pf}.protocol"), str_at(p, "/protocol"), PROTOCOLS);
        }
    }
    if let Some(g) = obj
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
    {
        if g < 0 {
            e.invalid(
                "spec.terminationGracePeriodSeconds",
                g,
                "must be greater than or equal to 0",
            );
        }
    }
    if let Some(old) = old {
        // As kube-apiserver: the pod spec is immutable but for a few fields. Binding (setting
        // spec.nodeName once) is allowed here because the lab scheduler binds by patch.
        let mut a = obj.get("spec").cloned().unwrap_or(Value::Null);
        let mut b = old.get("spec").cloned().unwrap_or(Value::Null);
        for s in [&mut a, &mut b] {
            if let Some(m) = s.as_object_mut() {
                m.remove("activeDeadlineSeconds");
                m.remove("tolerations");
            }
            for c in s
                .get_mut("containers")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(m) = c.as_object_mut() {
                    m.remove("image");
                }
            }
        }
        let old_node = str_at(old, "/spec/nodeName").unwrap_or_default();
        if old_node.is_empty() {
            if let Some(m) = a.as_object_mut() {
                m.remove("nodeName");
            }
            if let Some(m) = b.as_object_mut() {
                m.remove("nodeName");
            }
        }
        if a != b {
            e.forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations) or `spec.nodeName` (binding a pod that has none)");
        }
    }
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];

fn validate_service(obj: &Value, old: Option<&Value>, e: &mut Errs) {
    let ty = str_at(obj, "/spec/type").unwrap_or("ClusterIP");
    e.one_of("spec.type", Some(ty), SERVICE_TYPES);
    let cluster_ip = str_at(obj, "/spec/clusterIP").unwrap_or_default();
    let headless = cluster_ip == "None";
    let ports = arr_at(obj, "/spec/ports");
    if ports.is_empty() && !headless && ty != "ExternalName" {
        e.required("spec.ports");
    }
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let name = str_at(p, "/name").unwrap_or_default();
        if name.is_empty() {
            if ports.len() > 1 {
                e.required(format!("{f}.name"));
            }
        } else if let Some(problem) = dns1123_label_problem(name) {
            e.invalid(format!("{f}.name"), name, problem);
        } else if !names.insert(name.to_string()) {
            e.duplicate(format!("{f}.name"), name);
        }
        match p.get("port") {
            None => e.required(format!("{f}.port")),
            Some(v) => check_port_number(e, format!("{f}.port"), v),
        }
        let proto = str_at(p, "/protocol").unwrap_or("TCP");
        e.one_of(&format!("{f}.protocol"), Some(proto), PROTOCOLS);
        if let Some(tp) = p.get("targetPort") {
            check_int_or_name(e, format!("{f}.targetPort"), tp);
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            if np != 0 && ty != "NodePort" && ty != "LoadBalancer" {
                e.forbidden(
                    format!("{f}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                );
            } else if !(0..=65535).contains(&np) {
                e.invalid(
                    format!("{f}.nodePort"),
                    np,
                    "must be between 1 and 65535, inclusive",
                );
            }
        }
        let key = (p.get("port").and_then(Value::as_i64), proto.to_string());
        if !keys.insert(key.clone()) {
            e.duplicate(f, serde_json::json!({"port": key.0, "protocol": key.1}));
        }
    }
    if headless && (ty == "NodePort" || ty == "LoadBalancer") {
        e.invalid(
            "spec.clusterIPs[0]",
            "None",
            format!("may not be set to 'None' for {ty} services"),
        );
    }
    let ips = arr_at(obj, "/spec/clusterIPs");
    let mut fams = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let s = ip.as_str().unwrap_or_default();
        if s == "None" {
            if i > 0 || ips.len() > 1 {
                e.invalid(
                    format!("spec.clusterIPs[{i}]"),
                    s,
                    "'None' must be the only value",
                );
            }
            continue;
        }
        match s.parse::<IpAddr>() {
            Ok(a) => fams.push(if a.is_ipv4() { "IPv4" } else { "IPv6" }),
            Err(_) => e.invalid(
                format!("spec.clusterIPs[{i}]"),
                s,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ),
        }
    }
    if !cluster_ip.is_empty() && !headless && cluster_ip.parse::<IpAddr>().is_err() {
        e.invalid(
            "spec.clusterIP",
            cluster_ip,
            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        );
    }
    if fams.len() == 2 && fams[0] == fams[1] {
        e.invalid(
            "spec.clusterIPs",
            Value::from(ips.to_vec()),
            "may specify no more than one IP for each IP family",
        );
    }
    if !ips.is_empty() && !cluster_ip.is_empty() && ips[0].as_str() != Some(cluster_ip) {
        e.invalid(
            "spec.clusterIPs",
            Value::from(ips.to_vec()),
            "element [0] must match clusterIP",
        );
    }
    let families = arr_at(obj, "/spec/ipFamilies");
    let mut seen = HashSet::new();
    for (i, f) in families.iter().enumerate() {
        let s = f.as_str().unwrap_or_default();
        e.one_of(&format!("spec.ipFamilies[{i}]"), Some(s), &["IPv4", "IPv6"]);
        if !seen.insert(s) {
            e.duplicate(format!("spec.ipFamilies[{i}]"), s);
        }
    }
    e.one_of(
        "spec.ipFamilyPolicy",
        str_at(obj, "/spec/ipFamilyPolicy"),
        &["PreferDualStack", "RequireDualStack", "SingleStack"],
    );
    if str_at(obj, "/spec/ipFamilyPolicy") == Some("SingleStack") && families.len() > 1 {
        e.invalid(
            "spec.ipFamilies",
            Value::from(families.to_vec()),
            "when spec.ipFamilyPolicy is SingleStack, must contain exactly one IP family",
        );
    }
    for (i, ip) in arr_at(obj, "/spec/externalIPs").iter().enumerate() {
        let s = ip.as_str().unwrap_or_default();
        if s.parse::<IpAddr>().is_err() {
            e.invalid(
                format!("spec.externalIPs[{i}]"),
                s,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            );
        }
    }
    let affinity = str_at(obj, "/spec/sessionAffinity").unwrap_or("None");
    e.one_of(
        "spec.sessionAffinity",
        Some(affinity),
        &["ClientIP", "None"],
    );
    let timeout = obj.pointer("/spec/sessionAffinityConfig/clientIP/timeoutSeconds");
    if affinity == "ClientIP" {
        if let Some(t) = timeout {
            if !t.as_i64().is_some_and(|t| (1..=86400).contains(&t)) {
                e.invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t.clone(),
                    "must be greater than 0 and less than 86400",
                );
            }
        }
    } else if obj
        .pointer("/spec/sessionAffinityConfig")
        .is_some_and(|v| !v.is_null())
    {
        e.forbidden(
            "spec.sessionAffinityConfig",
            "must not be set when session affinity is None",
        );
    }
    let etp = str_at(obj, "/spec/externalTrafficPolicy");
    e.one_of("spec.externalTrafficPolicy", etp, &["Cluster", "Local"]);
    // validateServiceExternalTrafficPolicy: only for externally accessible Services (NodePort,
    // LoadBalancer, or ClusterIP with external IPs).
    let accessible = crate::defaults::externally_accessible(&obj["spec"]);
    if etp.is_some() && !accessible {
        e.invalid(
            "spec.externalTrafficPolicy",
            etp.unwrap_or_default(),
            "may only be set for externally-accessible services",
        );
    }
    e.one_of(
        "spec.internalTrafficPolicy",
        str_at(obj, "/spec/internalTrafficPolicy"),
        &["Cluster", "Local"],
    );
    let ranges = arr_at(obj, "/spec/loadBalancerSourceRanges");
    if !ranges.is_empty() && ty != "LoadBalancer" {
        e.forbidden(
            "spec.loadBalancerSourceRanges",
            "may only be used when `type` is 'LoadBalancer'",
        );
    }
    for (i, r) in ranges.iter().enumerate() {
        let s = r.as_str().unwrap_or_default();
        if let Err(m) = s.trim().parse::<IpNet>().map_err(|_| {
            "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 ".to_string()
        }) {
            e.invalid(format!("spec.loadBalancerSourceRanges[{i}]"), s, m);
        }
    }
    if let Some(sel) = obj.pointer("/spec/selector").and_then(Value::as_object) {
        for (k, v) in sel {
            if let Some(p) = label_key_problem(k) {
                e.invalid("spec.selector", k.as_str(), p);
            }
            if let Some(p) = v.as_str().and_then(label_value_problem) {
                e.invalid(format!("spec.selector[{k}]"), v.clone(), p);
            }
        }
    }
    if let Some(old) = old {
        let old_ips = arr_at(old, "/spec/clusterIPs");
        if ty != "ExternalName" && !old_ips.is_empty() && !ips.is_empty() && old_ips[0] != ips[0] {
            e.invalid(
                "spec.clusterIPs[0]",
                ips[0].clone(),
                "may not change once set",
            );
        }
        let old_fams = arr_at(old, "/spec/ipFamilies");
        if !old_fams.is_empty()
            && !families.is_empty()
            && old_fams[0] != families[0]
            && ty != "ExternalName"
        {
            e.invalid(
                "spec.ipFamilies[0]",
                families[0].clone(),
                "may not change once set",
            );
        }
    }
}

fn validate_node(obj: &Value, e: &mut Errs) {
    if let Some(c) = str_at(obj, "/spec/podCIDR") {
        if let Err(m) = parse_cidr(c) {
            e.invalid("spec.podCIDR", c, m);
        }
    }
    for (i, c) in arr_at(obj, "/spec/podCIDRs").iter().enumerate() {
        let s = c.as_str().unwrap_or_default();
        if let Err(m) = parse_cidr(s) {
            e.invalid(format!("spec.podCIDRs[{i}]"), s, m);
        }
    }
}

fn validate_endpoint_slice(obj: &Value, old: Option<&Value>, e: &mut Errs) {
    let at = str_at(obj, "/addressType");
    match at {
        None => e.required("addressType"),
        Some(t) => e.one_of("addressType", Some(t), &["FQDN", "IPv4", "IPv6"]),
    }
    if let Some(old) = old {
        if str_at(old, "/addressType") != at {
            e.invalid("addressType", at.unwrap_or_default(), "field is immutable");
        }
    }
    let endpoints = arr_at(obj, "/endpoints");
    if endpoints.len() > 1000 {
        e.invalid("endpoints", endpoints.len(), "must have at most 1000 items");
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let addrs = arr_at(ep, "/addresses");
        if addrs.is_empty() {
            e.required(format!("endpoints[{i}].addresses"));
        }
        if addrs.len() > 100 {
            e.invalid(
                format!("endpoints[{i}].addresses"),
                addrs.len(),
                "must have at most 100 items",
            );
        }
        for (j, a) in addrs.iter().enumerate() {
            let s = a.as_str().unwrap_or_default();
            let f = format!("endpoints[{i}].addresses[{j}]");
            match at {
                Some("IPv4") if !s.parse::<IpAddr>().is_ok_and(|a| a.is_ipv4()) => {
                    e.invalid(f, s, "must be a valid IPv4 address")
                }
                Some("IPv6") if !s.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6()) => {
                    e.invalid(f, s, "must be a valid IPv6 address")
                }
                Some("FQDN") => {
                    if let Some(p) = dns1123_subdomain_problem(s) {
                        e.invalid(f, s, p)
                    }
                }
                _ => {}
            }
        }
        if let Some(n) = str_at(ep, "/nodeName") {
            if let Some(p) = dns1123_subdomain_problem(n) {
                e.invalid(format!("endpoints[{i}].nodeName"), n, p);
            }
        }
    }
    let mut names = HashSet::new();
    for (i, p) in arr_at(obj, "/ports").iter().enumerate() {
        let name = str_at(p, "/name").unwrap_or_default();
        if !name.is_empty() {
            if let Some(problem) = dns1123_label_problem(name) {
                e.invalid(format!("ports[{i}].name"), name, problem);
            }
        }
        if !names.insert(name.to_string()) {
            e.duplicate(format!("ports[{i}].name"), name);
        }
        if let Some(v) = p.get("port").filter(|v| !v.is_null()) {
            check_port_number(e, format!("ports[{i}].port"), v);
        }
        e.one_of(
            &format!("ports[{i}].protocol"),
            str_at(p, "/protocol"),
            PROTOCOLS,
        );
    }
}

/// The identity numbers pods get (weir-control's policy::id::POD_MIN..=POD_MAX).
const IDENTITY_RANGE: std::ops::RangeInclusive<u64> = 256..=(1 << 24) - 1;

/// RemoteEndpoint: `spec.cluster`, `spec.namespace` and `spec.pod` required; `ips` addresses;
/// label maps of strings.
fn validate_remote_endpoint(obj: &Value, e: &mut Errs) {
    for field in ["cluster", "namespace", "pod"] {
        match str_at(obj, &format!("/spec/{field}")) {
            Some(v) if !v.is_empty() => {}
            _ => e.required(format!("spec.{field}")),
        }
    }
    for (i, ip) in arr_at(obj, "/spec/ips").iter().enumerate() {
        if ip
            .as_str()
            .is_none_or(|s| s.parse::<std::net::IpAddr>().is_err())
        {
            e.invalid(
                format!("spec.ips[{i}]"),
                ip.clone(),
                "must be a valid IP address",
            );
        }
    }
    check_label_maps(obj, &["labels", "namespaceLabels"], e);
}

/// RemoteNode: `spec.cluster` and `spec.node` required; addresses and pod CIDRs well formed.
fn validate_remote_node(obj: &Value, e: &mut Errs) {
    for field in ["cluster", "node"] {
        match str_at(obj, &format!("/spec/{field}")) {
            Some(v) if !v.is_empty() => {}
            _ => e.required(format!("spec.{field}")),
        }
    }
    for (i, ip) in arr_at(obj, "/spec/addresses").iter().enumerate() {
        if ip
            .as_str()
            .is_none_or(|s| s.parse::<std::net::IpAddr>().is_err())
        {
            e.invalid(
                format!("spec.addresses[{i}]"),
                ip.clone(),
                "must be a valid IP address",
            );
        }
    }
    for (i, c) in arr_at(obj, "/spec/podCIDRs").iter().enumerate() {
        if c.as_str().is_none_or(|s| parse_cidr(s).is_err()) {
            e.invalid(
                format!("spec.podCIDRs[{i}]"),
                c.clone(),
                "must be a valid CIDR",
            );
        }
    }
}

fn check_label_maps(obj: &Value, fields: &[&str], e: &mut Errs) {
    for field in fields {
        match obj.pointer(&format!("/spec/{field}")) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if !v.is_string() {
                        e.invalid(format!("spec.{field}[{k}]"), v.clone(), "must be a string");
                    }
                }
            }
            Some(other) => e.invalid(
                format!("spec.{field}"),
                other.clone(),
                "must be a map of label keys to values",
            ),
        }
    }
}

fn validate_security_identity(obj: &Value, e: &mut Errs) {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    if !name
        .parse::<u64>()
        .is_ok_and(|n| IDENTITY_RANGE.contains(&n))
        || name.starts_with('0')
    {
        e.invalid(
            "metadata.name",
            Value::String(name.into()),
            "must be a decimal identity number from 256 to 16777215",
        );
    }
    match str_at(obj, "/spec/namespace") {
        Some(ns) if !ns.is_empty() => {}
        _ => e.required("spec.namespace"),
    }
    check_label_maps(obj, &["namespaceLabels", "podLabels"], e);
}

fn validate_network_policy(obj: &Value, e: &mut Errs) {
    if obj.pointer("/spec/podSelector").is_none() {
        e.required("spec.podSelector");
    }
    check_selector(obj.pointer("/spec/podSelector"), "spec.podSelector", e);
    let mut types = BTreeSet::new();
    for (i, t) in arr_at(obj, "/spec/policyTypes").iter().enumerate() {
        let s = t.as_str().unwrap_or_default();
        e.one_of(
            &format!("spec.policyTypes[{i}]"),
            Some(s),
            &["Egress", "Ingress"],
        );
        if !types.insert(s) {
            e.duplicate(format!("spec.policyTypes[{i}]"), s);
        }
    }
    for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in arr_at(obj, &format!("/spec/{dir}")).iter().enumerate() {
            let rf = format!("spec.{dir}[{i}]");
            for (j, port) in arr_at(rule, "/ports").iter().enumerate() {
                let pf = format!("{rf}.ports[{j}]");
                e.one_of(
                    &format!("{pf}.protocol"),
                    str_at(port, "/protocol"),
                    PROTOCOLS,
                );
                if let Some(p) = port.get("port").filter(|v| !v.is_null()) {
                    check_int_or_name(e, format!("{pf}.port"), p);
                }
                if let Some(end) = port.get("endPort").filter(|v| !v.is_null()) {
                    match port.get("port").and_then(Value::as_i64) {
                        None => e.required(format!("{pf}.port")),
                        Some(start) => {
                            let end_n = end.as_i64().unwrap_or(0);
                            if !(1..=65535).contains(&end_n) {
                                e.invalid(
                                    format!("{pf}.endPort"),
                                    end.clone(),
                                    "must be between 1 and 65535, inclusive",
                                );
                            } else if end_n < start {
                                e.invalid(
                                    format!("{pf}.endPort"),
                                    end.clone(),
                                    "must be greater than or equal to `port`",
                                );
                            }
                        }
                    }
                }
            }
            for (j, peer) in arr_at(rule, &format!("/{peers_key}")).iter().enumerate() {
                let pf = format!("{rf}.{peers_key}[{j}]");
                let has_ip = peer.get("ipBlock").is_some_and(|v| !v.is_null());
                let has_sel = ["podSelector", "namespaceSelector"]
                    .iter()
                    .any(|k| peer.get(*k).is_some_and(|v| !v.is_null()));
                if has_ip && has_sel {
                    e.forbidden(pf.clone(), "may not specify both ipBlock and another peer");
                } else if !has_ip && !has_sel {
                    e.required(format!("{pf}: must specify a peer"));
                }
                check_selector(peer.get("podSelector"), &format!("{pf}.podSelector"), e);
                check_selector(
                    peer.get("namespaceSelector"),
                    &format!("{pf}.namespaceSelector"),
                    e,
                );
                if has_ip {
                    let cidr = str_at(peer, "/ipBlock/cidr").unwrap_or_default();
                    match cidr.parse::<IpNet>() {
                        Err(_) => e.invalid(
                            format!("{pf}.ipBlock.cidr"),
                            cidr,
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        ),
                        Ok(net) => {
                            for (k, ex) in arr_at(peer, "/ipBlock/except").iter().enumerate() {
                                let s = ex.as_str().unwrap_or_default();
                                let ef = format!("{pf}.ipBlock.except[{k}]");
                                match s.parse::<IpNet>() {
                                    Err(_) => e.invalid(ef, s, "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"),
                                    Ok(x) if !(net.contains(&x) && x.prefix_len() > net.prefix_len()) => {
                                        e.invalid(ef, s, "must be a strict subset of `cidr`")
                                    }
                                    Ok(_) => {}
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn check_selector(sel: Option<&Value>, field: &str, e: &mut Errs) {
    let Some(sel) = sel.filter(|v| !v.is_null()) else {
        return;
    };
    match serde_json::from_value(sel.clone()) {
        Ok(s) => {
            if let Err(err) = crate::selector::LabelSelector::from_k8s(&s) {
                e.invalid(field, sel.clone(), err.to_string());
            }
        }
        Err(err) => e.invalid(field, sel.clone(), err.to_string()),
    }
}

/// The kind named by an object's `apiVersion` and `kind`, or a kubectl-style error.
pub fn kind_of(obj: &Value) -> Result<&'static ResourceKind, String> {
    let api_version = str_at(obj, "/apiVersion").unwrap_or_default();
    let kind = str_at(obj, "/kind").unwrap_or_default();
    if kind.is_empty() {
        return Err("Object 'Kind' is missing".into());
    }
    if api_version.is_empty() {
        return Err(format!("Object 'apiVersion' is missing in kind {kind:?}"));
    }
    kinds::by_api_version_kind(api_version, kind)
        .ok_or_else(|| format!("no matches for kind {kind:?} in version {api_version:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::*;
    use serde_json::json;

    fn svc(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x"}, "spec": spec})
    }

    #[test]
    fn service_messages_name_object_and_field() {
        let err = validate(&SERVICE, &svc(json!({"ports": [{"port": 0}]})), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service \"web\" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        let err = validate(&SERVICE, &svc(json!({})), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service \"web\" is invalid: spec.ports: Required value"
        );
        let err = validate(
            &SERVICE,
            &svc(json!({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 80}]})),
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.ports[1].name: Duplicate value: \"a\""),
            "{err}"
        );
        assert!(
            err.to_string().contains("spec.ports[1]: Duplicate value"),
            "{err}"
        );
        let err = validate(
            &SERVICE,
            &svc(json!({"ports": [{"port": 80}, {"port": 81}]})),
            None,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("spec.ports[0].name: Required value"));
        let err = validate(
            &SERVICE,
            &svc(json!({"ports": [{"name": "Bad_Name", "port": 80}]})),
            None,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("spec.ports[0].name: Invalid value: \"Bad_Name\""));
        let err = validate(
            &SERVICE,
            &svc(json!({"clusterIP": "10.0.0.300", "ports": [{"port": 80}]})),
            None,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("spec.clusterIP: Invalid value: \"10.0.0.300\""));
        let err = validate(
            &SERVICE,
            &svc(json!({"type": "Foo", "ports": [{"port": 80}]})),
            None,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("spec.type: Unsupported value: \"Foo\""));
    }

    #[test]
    fn security_identities_are_numbered_and_name_their_labels() {
        use crate::kinds::SECURITY_IDENTITY;
        let id = |name: &str, spec: Value| {
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "SecurityIdentity",
                   "metadata": {"name": name}, "spec": spec})
        };
        let good =
            json!({"namespace": "x", "namespaceLabels": {"ns": "x"}, "podLabels": {"pod": "a"}});
        assert!(validate(&SECURITY_IDENTITY, &id("256", good.clone()), None).is_ok());
        for bad in ["255", "0256", "16777216", "web"] {
            let err = validate(&SECURITY_IDENTITY, &id(bad, good.clone()), None).unwrap_err();
            assert!(err.to_string().contains("metadata.name"), "{bad}: {err}");
        }
        let err = validate(
            &SECURITY_IDENTITY,
            &id("300", json!({"podLabels": {"a": 1}})),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("spec.namespace") && err.contains("spec.podLabels[a]"),
            "{err}"
        );
    }

    #[test]
    fn typed_errors_carry_the_path() {
        let err =
            validate(&SERVICE, &svc(json!({"ports": [{"port": "eighty"}]})), None).unwrap_err();
        assert!(err.to_string().contains("spec.ports[0].port"), "{err}");
    }

    #[test]
    fn immutable_cluster_ip() {
        let old = svc(
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}),
        );
        let new = svc(
            json!({"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"], "ports": [{"port": 80}]}),
        );
        let err = validate(&SERVICE, &new, Some(&old)).unwrap_err();
        assert!(err.to_string().contains("may not change once set"));
    }

    #[test]
    fn pod_rules() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [
                {"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "http"},
                {"containerPort": 70000}, {"containerPort": 82, "name": "toolongportname-x"}]}]}});
        let err = validate(&POD, &pod, None).unwrap_err().to_string();
        assert!(
            err.contains("spec.containers[0].ports[1].name: Duplicate value: \"http\""),
            "{err}"
        );
        assert!(
            err.contains("spec.containers[0].ports[2].containerPort: Invalid value: 70000"),
            "{err}"
        );
        assert!(err.contains("ports[3].name: Invalid value"), "{err}");
    }

    #[test]
    fn network_policy_rules() {
        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "n", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}],
                     "ports": [{"port": 100, "endPort": 90}]}]}});
        let err = validate(&NETWORK_POLICY, &np, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.ingress[0].from[0].ipBlock.except[0]"),
            "{err}"
        );
        assert!(err.contains("spec.ingress[0].ports[0].endPort"), "{err}");
    }

    #[test]
    fn names() {
        assert!(dns1123_label_problem("a-b").is_none());
        assert!(dns1123_label_problem("A").is_some());
        assert!(dns1035_label_problem("1a").is_some());
        assert!(iana_svc_name_problem("http-alt").is_none());
        assert!(iana_svc_name_problem("80").is_some());
        assert!(label_key_problem("app.kubernetes.io/name").is_none());
        assert!(label_key_problem("-x").is_some());
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(
            kind_of(&json!({"apiVersion": "apps/v1", "kind": "Deployment"}))
                .unwrap_err()
                .contains("no matches for kind")
        );
    }
}
