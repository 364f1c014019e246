//! Validation of weir.dev/v1alpha1 GlobalTrafficPolicy (cross-cluster traffic scheduling for
//! the ServiceImport of the same name): every field named when it is wrong, nothing applied.

use serde_json::Value;

use super::{arr_at, str_at, Errs};

/// The policy kinds.
pub const LB_TYPES: &[&str] = &["Locality", "FailOver", "ActiveActive"];
/// At most this many priority levels.
pub const MAX_LEVELS: usize = 16;
/// At most this many ActiveActive targets (the datapath's group table holds 64).
pub const MAX_TARGETS: usize = 64;
/// The largest ActiveActive weight.
pub const MAX_WEIGHT: i64 = 1_000_000;

/// An integer field at `ptr` within `lo..=hi` when present.
fn int_in(obj: &Value, ptr: &str, field: &str, lo: i64, hi: i64, e: &mut Errs) {
    match obj.pointer(ptr) {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => {}
            Some(_) if hi == i64::MAX => {
                e.invalid(field, v.clone(), format!("must be at least {lo}"))
            }
            Some(_) => e.invalid(field, v.clone(), format!("must be between {lo} and {hi}")),
            None => e.invalid(field, v.clone(), "must be an integer"),
        },
    }
}

/// A Go duration (`30s`, `1m30s`, `500ms`: numbers with units ns, us, ms, s, m, h) in
/// milliseconds; None if it does not parse.
pub fn duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, ms) = [
            ("ns", 1e-6),
            ("us", 1e-3),
            ("µs", 1e-3),
            ("ms", 1.0),
            ("s", 1e3),
            ("m", 60e3),
            ("h", 3600e3),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += n * ms;
    }
    Some(total.round() as u64)
}

fn duration_ok(s: &str) -> bool {
    duration_ms(s).is_some()
}

fn strings(obj: &Value, ptr: &str, field: &str, e: &mut Errs) {
    match obj.pointer(ptr) {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (i, v) in a.iter().enumerate() {
                if v.as_str().is_none_or(str::is_empty) {
                    e.invalid(
                        format!("{field}[{i}]"),
                        v.clone(),
                        "must be a non-empty string",
                    );
                }
            }
        }
        Some(v) => e.invalid(field, v.clone(), "must be a list of strings"),
    }
}

/// GlobalTrafficPolicy: `spec.lbType` one of Locality, FailOver, ActiveActive; at most 64
/// targets, each with a cluster and a weight 0-1000000; at most 16 priority levels, each `clusters` or
/// `selector` (`sameAsImporter` property names; `{}` is every cluster left); the
/// overprovisioning factor a number of at least 1; the panic threshold 0-100; outlier
/// detection's failures at least 1, base ejection time a duration, max ejection percent 0-100.
pub fn validate_global_traffic_policy(obj: &Value, e: &mut Errs) {
    match str_at(obj, "/spec/lbType") {
        None => e.required("spec.lbType"),
        Some(t) => e.one_of("spec.lbType", Some(t), LB_TYPES),
    }
    for (i, t) in arr_at(obj, "/spec/targets").iter().enumerate() {
        let f = format!("spec.targets[{i}]");
        if t.get("cluster")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            e.required(format!("{f}.cluster"));
        }
        match t.get("weight") {
            None | Some(Value::Null) => e.required(format!("{f}.weight")),
            Some(_) => int_in(t, "/weight", &format!("{f}.weight"), 0, MAX_WEIGHT, e),
        }
    }
    let targets = arr_at(obj, "/spec/targets");
    if targets.len() > MAX_TARGETS {
        e.invalid(
            "spec.targets",
            Value::from(targets.len()),
            format!("must have at most {MAX_TARGETS} targets"),
        );
    }
    let levels = arr_at(obj, "/spec/priorities");
    if levels.len() > MAX_LEVELS {
        e.invalid(
            "spec.priorities",
            Value::from(levels.len()),
            format!("must have at most {MAX_LEVELS} levels"),
        );
    }
    for (i, l) in levels.iter().enumerate() {
        let f = format!("spec.priorities[{i}]");
        let (clusters, selector) = (l.get("clusters"), l.get("selector"));
        match (
            clusters.is_some_and(|v| !v.is_null()),
            selector.is_some_and(|v| !v.is_null()),
        ) {
            (true, true) => e.forbidden(f.clone(), "set one of clusters and selector, not both"),
            (false, false) => e.required(format!("{f}.clusters")),
            _ => {}
        }
        strings(l, "/clusters", &format!("{f}.clusters"), e);
        if let Some(s) = selector.filter(|v| !v.is_null()) {
            if !s.is_object() {
                e.invalid(format!("{f}.selector"), s.clone(), "must be an object");
            }
            strings(
                l,
                "/selector/sameAsImporter",
                &format!("{f}.selector.sameAsImporter"),
                e,
            );
        }
    }
    match obj.pointer("/spec/overprovisioningFactor") {
        None | Some(Value::Null) => {}
        Some(v) => {
            if v.as_f64().is_none_or(|f| !(1.0..=100.0).contains(&f)) {
                e.invalid(
                    "spec.overprovisioningFactor",
                    v.clone(),
                    "must be a number of at least 1 (and at most 100)",
                );
            }
        }
    }
    int_in(
        obj,
        "/spec/panicThreshold",
        "spec.panicThreshold",
        0,
        100,
        e,
    );
    let od = "/spec/outlierDetection";
    int_in(
        obj,
        &format!("{od}/consecutiveFailures"),
        "spec.outlierDetection.consecutiveFailures",
        1,
        i64::MAX,
        e,
    );
    int_in(
        obj,
        &format!("{od}/maxEjectionPercent"),
        "spec.outlierDetection.maxEjectionPercent",
        0,
        100,
        e,
    );
    if let Some(v) = obj
        .pointer(&format!("{od}/baseEjectionTime"))
        .filter(|v| !v.is_null())
    {
        if v.as_str().is_none_or(|s| !duration_ok(s)) {
            e.invalid(
                "spec.outlierDetection.baseEjectionTime",
                v.clone(),
                "must be a duration such as 30s or 1m30s",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(spec: Value) -> Vec<String> {
        let mut e = Errs::default();
        validate_global_traffic_policy(&json!({"spec": spec}), &mut e);
        e.0.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn the_issues_example_is_valid() {
        let spec = json!({"lbType": "FailOver",
            "targets": [{"cluster": "c2", "weight": 80}, {"cluster": "c3", "weight": 20}],
            "priorities": [{"clusters": ["c1"]}, {"selector": {"sameAsImporter": ["region.weir.dev"]}}, {"selector": {}}],
            "overprovisioningFactor": 1.4, "panicThreshold": 50,
            "outlierDetection": {"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 100}});
        assert_eq!(errors(spec), Vec::<String>::new());
        assert_eq!(
            errors(json!({"lbType": "ActiveActive"})),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({}), "spec.lbType: Required value"),
            (
                json!({"lbType": "Random"}),
                "spec.lbType: Unsupported value: \"Random\"",
            ),
            (
                json!({"lbType": "ActiveActive", "targets": [{"cluster": "c2", "weight": -1}]}),
                "spec.targets[0].weight: Invalid value: -1: must be between 0 and 1000000",
            ),
            (
                json!({"lbType": "ActiveActive", "targets": [{"weight": 1}]}),
                "spec.targets[0].cluster: Required value",
            ),
            (
                json!({"lbType": "FailOver", "overprovisioningFactor": 0.9}),
                "spec.overprovisioningFactor: Invalid value: 0.9",
            ),
            (
                json!({"lbType": "FailOver", "panicThreshold": 101}),
                "spec.panicThreshold: Invalid value: 101: must be between 0 and 100",
            ),
            (
                json!({"lbType": "FailOver", "priorities": [{"clusters": ["c1"], "selector": {}}]}),
                "spec.priorities[0]: Forbidden",
            ),
            (
                json!({"lbType": "FailOver", "outlierDetection": {"baseEjectionTime": "soon"}}),
                "spec.outlierDetection.baseEjectionTime: Invalid value: \"soon\"",
            ),
            (
                json!({"lbType": "FailOver", "outlierDetection": {"consecutiveFailures": 0}}),
                "spec.outlierDetection.consecutiveFailures: Invalid value: 0: must be at least 1",
            ),
        ];
        for (spec, want) in cases {
            let got = errors(spec.clone());
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{spec}: {got:?} has no {want}"
            );
        }
        let levels: Vec<Value> = (0..17)
            .map(|i| json!({"clusters": [format!("c{i}")]}))
            .collect();
        let got = errors(json!({"lbType": "FailOver", "priorities": levels}));
        assert!(
            got.iter().any(|g| g.contains("at most 16 levels")),
            "{got:?}"
        );
        assert!(
            duration_ok("1m30s") && duration_ok("500ms") && !duration_ok("30") && !duration_ok("")
        );
    }
}
