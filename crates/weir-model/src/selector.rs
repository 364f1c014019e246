//! Label and field selectors, in the string form of `labelSelector`/`fieldSelector` query
//! parameters and in the structured form (`matchLabels`/`matchExpressions`) of API objects.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;
use serde_json::Value;

/// A selector could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} selector {input:?}: {reason}")]
pub struct SelectorError {
    what: &'static str,
    input: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; all requirements must hold (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// Parses the string form: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let err = |reason: &str| SelectorError {
            what: "label",
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let mut reqs = Vec::new();
        for term in split_top_level(input) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            if let Some(key) = term.strip_prefix('!') {
                let key = key.trim();
                check_label_key(key).map_err(|e| err(&e))?;
                reqs.push(LabelRequirement::NotExists(key.to_string()));
            } else if let Some((k, v)) = term.split_once("!=") {
                reqs.push(LabelRequirement::NotEq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = term.split_once("==") {
                reqs.push(LabelRequirement::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = term.split_once('=') {
                reqs.push(LabelRequirement::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, set)) = split_set_op(term, " notin ") {
                reqs.push(LabelRequirement::NotIn(
                    k,
                    parse_set(set).map_err(|e| err(&e))?,
                ));
            } else if let Some((k, set)) = split_set_op(term, " in ") {
                reqs.push(LabelRequirement::In(
                    k,
                    parse_set(set).map_err(|e| err(&e))?,
                ));
            } else {
                check_label_key(term).map_err(|e| err(&e))?;
                reqs.push(LabelRequirement::Exists(term.to_string()));
            }
        }
        for r in &reqs {
            let key = match r {
                LabelRequirement::Eq(k, _)
                | LabelRequirement::NotEq(k, _)
                | LabelRequirement::In(k, _)
                | LabelRequirement::NotIn(k, _)
                | LabelRequirement::Exists(k)
                | LabelRequirement::NotExists(k) => k,
            };
            check_label_key(key).map_err(|e| err(&e))?;
        }
        Ok(LabelSelector { reqs })
    }

    /// Builds a selector from the structured API form. A `None` selector (or `{}`) matches
    /// everything, as in NetworkPolicy podSelector; callers that need "nothing" for a missing
    /// selector (Services) check for absence themselves.
    pub fn from_k8s(sel: &K8sLabelSelector) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(LabelRequirement::Eq(k.clone(), v.clone()));
        }
        for e in sel.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let bad = |reason: &str| SelectorError {
                what: "label",
                input: format!("{} {} {:?}", e.key, e.operator, values),
                reason: reason.to_string(),
            };
            reqs.push(match e.operator.as_str() {
                "In" if !values.is_empty() => LabelRequirement::In(e.key.clone(), values),
                "NotIn" if !values.is_empty() => LabelRequirement::NotIn(e.key.clone(), values),
                "Exists" if values.is_empty() => LabelRequirement::Exists(e.key.clone()),
                "DoesNotExist" if values.is_empty() => LabelRequirement::NotExists(e.key.clone()),
                "In" | "NotIn" => return Err(bad("values must be non-empty for In and NotIn")),
                "Exists" | "DoesNotExist" => {
                    return Err(bad("values must be empty for Exists and DoesNotExist"))
                }
                _ => return Err(bad("operator must be In, NotIn, Exists or DoesNotExist")),
            });
        }
        Ok(LabelSelector { reqs })
    }

    /// A selector matching exactly the given labels (a Service's `spec.selector`).
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        LabelSelector {
            reqs: map
                .iter()
                .map(|(k, v)| LabelRequirement::Eq(k.clone(), v.clone()))
                .collect(),
        }
    }

    /// True when the selector has no requirement (matches everything).
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            LabelRequirement::Eq(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEq(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// Whether the `metadata.labels` of a JSON object satisfy the selector.
    pub fn matches_object(&self, obj: &Value) -> bool {
        if self.reqs.is_empty() {
            return true;
        }
        self.matches(&labels_of(obj))
    }
}

/// The `metadata.labels` of a JSON object.
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn split_top_level(input: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in input.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn split_set_op<'a>(term: &'a str, op: &str) -> Option<(String, &'a str)> {
    let idx = term.find(op)?;
    Some((
        term[..idx].trim().to_string(),
        term[idx + op.len()..].trim(),
    ))
}

fn parse_set(set: &str) -> Result<Vec<String>, String> {
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| "a set must be written (a,b,...)".to_string())?;
    Ok(inner
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

fn check_label_key(key: &str) -> Result<(), String> {
    crate::validate::label_key_problem(key).map_or(Ok(()), |p| Err(format!("key {key:?}: {p}")))
}

/// One `fieldSelector` requirement: a field path, `=`/`==` or `!=`, and a value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    path: String,
    equal: bool,
    value: String,
}

/// A parsed field selector. Supported fields: `metadata.name`, `metadata.namespace`, and any
/// `spec.*`/`status.*` scalar (e.g. `spec.nodeName`, `status.phase`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in input.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(SelectorError {
                    what: "field",
                    input: input.to_string(),
                    reason: format!("{term:?} is not of the form field=value or field!=value"),
                });
            };
            let path = path.trim();
            let known = path == "metadata.name"
                || path == "metadata.namespace"
                || path.starts_with("spec.")
                || path.starts_with("status.");
            if !known {
                return Err(SelectorError {
                    what: "field",
                    input: input.to_string(),
                    reason: format!("field label not supported: {path}"),
                });
            }
            reqs.push(FieldRequirement {
                path: path.to_string(),
                equal,
                value: value.trim().to_string(),
            });
        }
        Ok(FieldSelector { reqs })
    }

    /// Whether the JSON object satisfies every requirement. A missing field reads as "".
    pub fn matches_object(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|r| {
            let pointer = format!("/{}", r.path.replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (actual == r.value) == r.equal
        })
    }

    /// The value required for `metadata.name`, if the selector pins it (used to narrow lists).
    pub fn pinned_name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|r| r.equal && r.path == "metadata.name")
            .map(|r| r.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_string_forms() {
        let s = LabelSelector::parse("app=web,tier!=db,env in (prod, qa),!legacy,team").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "qa"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev"), ("team", "x")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("env", "qa"),
            ("team", "x"),
            ("legacy", "1")
        ])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "qa")])));
        let n = LabelSelector::parse("env notin (prod)").unwrap();
        assert!(n.matches(&labels(&[])));
        assert!(!n.matches(&labels(&[("env", "prod")])));
        assert!(LabelSelector::parse("").unwrap().is_empty());
        assert!(LabelSelector::parse("env in prod").is_err());
        assert!(LabelSelector::parse("-bad=1").is_err());
    }

    #[test]
    fn structured_selector() {
        let sel: K8sLabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "a"},
            "matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        let s = LabelSelector::from_k8s(&sel).unwrap();
        assert!(s.matches(&labels(&[("app", "a")])));
        assert!(!s.matches(&labels(&[("app", "a"), ("x", "")])));
        let bad: K8sLabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "x", "operator": "In", "values": []}]
        }))
        .unwrap();
        assert!(LabelSelector::from_k8s(&bad).is_err());
    }

    #[test]
    fn field_selector() {
        let pod = json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"nodeName": "n1"}});
        let f = FieldSelector::parse("metadata.name=p,spec.nodeName==n1").unwrap();
        assert!(f.matches_object(&pod));
        assert_eq!(f.pinned_name(), Some("p"));
        assert!(!FieldSelector::parse("spec.nodeName!=n1")
            .unwrap()
            .matches_object(&pod));
        assert!(FieldSelector::parse("spec.nodeName=")
            .unwrap()
            .matches_object(&json!({"spec": {}})));
        assert!(FieldSelector::parse("foo=bar").is_err());
    }
}
