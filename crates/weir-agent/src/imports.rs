//! ServiceImports under GlobalTrafficPolicies: what each import's frontends are scheduled with
//! (its policy, the levels the mesh placed, the backends the datapath has ejected), the watch
//! of the datapath's ejection events, and the view `weir status` shows.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use kube::runtime::reflector::{self, Store};
use serde::Serialize;
use serde_json::Value;
use weir_control::import_schedule::ImportSchedule;
use weir_control::lb::{Backend, FrontendKey, Proto, Scheduled};
use weir_control::schedule::{PolicySpec, ShareRow};
use weir_dataplane::Ejection;

/// The inputs of every import's schedule on this node.
#[derive(Default)]
pub struct Scheduling {
    /// The GlobalTrafficPolicies (None where they are not watched).
    pub policies: Option<Store<DynamicObject>>,
    /// This cluster's id.
    pub importer: String,
    /// Backends the datapath has ejected now (TCP: outcomes are counted for TCP only).
    pub ejected: HashSet<Backend>,
    /// When the next ejection ends.
    pub next_readmission: Option<Instant>,
}

impl Scheduling {
    /// The schedule of import `ns`/`name`.
    pub fn for_import(&self, ns: &str, name: &str) -> ImportSchedule {
        let gtp = self.policies.as_ref().and_then(|s| {
            let ar = crate::api_resource(&weir_model::kinds::GLOBAL_TRAFFIC_POLICY);
            s.get(&reflector::ObjectRef::new_with(name, ar).within(ns))
        });
        let policy = gtp
            .as_ref()
            .and_then(|o| o.data.get("spec"))
            .and_then(|s| serde_json::from_value::<PolicySpec>(s.clone()).ok());
        ImportSchedule {
            policy,
            levels: gtp.as_ref().and_then(|o| levels_from_status(&o.data)),
            importer: self.importer.clone(),
            ejected: self.ejected.clone(),
        }
    }

    /// Takes the datapath's health entries: returns the backends whose ejection began or
    /// ended since the last call.
    pub fn refresh(&mut self, health: &[Ejection]) -> HashSet<Backend> {
        let now: HashSet<Backend> = health
            .iter()
            .filter(|h| h.remaining_ms > 0 && h.proto == Proto::Tcp)
            .map(|h| h.backend)
            .collect();
        self.next_readmission = health
            .iter()
            .filter(|h| h.remaining_ms > 0)
            .map(|h| Instant::now() + Duration::from_millis(h.remaining_ms + 1))
            .min();
        let changed = now.symmetric_difference(&self.ejected).copied().collect();
        self.ejected = now;
        changed
    }
}

/// This cluster's id from its ClusterProperties (`cluster.clusterset.k8s.io`), or "".
pub fn cluster_id(properties: &Store<DynamicObject>) -> String {
    properties
        .state()
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("cluster.clusterset.k8s.io"))
        .and_then(|p| p.data.pointer("/spec/value").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string()
}

/// The FailOver levels the mesh placed the exporting clusters in (the policy's
/// `status.clusters[].level`), if it has written them.
fn levels_from_status(data: &Value) -> Option<Vec<Vec<String>>> {
    let rows = data.pointer("/status/clusters")?.as_array()?;
    let mut levels: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let (Some(c), Some(l)) = (
            r.get("cluster").and_then(Value::as_str),
            r.get("level").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let l = l as usize;
        if l >= weir_model::validate::MAX_LEVELS {
            continue;
        }
        if levels.len() <= l {
            levels.resize(l + 1, Vec::new());
        }
        levels[l].push(c.to_string());
    }
    Some(levels)
}

/// Reads the datapath's ejection events at `path` on a thread of its own, calling `wake` for
/// each.
pub fn spawn_ejection_watch(path: PathBuf, wake: impl Fn() + Send + 'static) -> Result<(), String> {
    crate::ring::spawn(
        "weir-ejections",
        "the ejection events",
        move || weir_bpf::watch_ejections(&path, move |_| wake()),
        |rb, wait| rb.poll(wait),
    )
}

/// An import frontend's schedule, for `weir status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImportStatus {
    /// `namespace/name` of the ServiceImport.
    pub import: String,
    /// The frontend.
    pub frontend: String,
    /// Its GlobalTrafficPolicy's type, if it has one.
    pub policy: Option<String>,
    /// Per exporting cluster.
    pub clusters: Vec<ShareRow>,
    /// Backends left out because the datapath ejected them.
    pub ejected: Vec<String>,
}

/// The status rows of one import's frontends.
pub fn status_of(
    import: &str,
    policy: Option<&str>,
    scheduled: &BTreeMap<FrontendKey, Scheduled>,
) -> Vec<ImportStatus> {
    scheduled
        .iter()
        .map(|(k, s)| ImportStatus {
            import: import.to_string(),
            frontend: k.to_string(),
            policy: policy.map(String::from),
            clusters: s.plan.iter().map(ShareRow::from).collect(),
            ejected: s.ejected.iter().map(|b| b.to_string()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_come_from_the_status_rows() {
        let data = serde_json::json!({"status": {"clusters": [
            {"cluster": "c1", "level": 0}, {"cluster": "c2", "level": 2},
            {"cluster": "c3", "level": 1}, {"cluster": "c4"}]}});
        assert_eq!(
            levels_from_status(&data).unwrap(),
            [vec!["c1".to_string()], vec!["c3".into()], vec!["c2".into()]]
        );
        assert!(levels_from_status(&serde_json::json!({})).is_none());
    }

    #[test]
    fn refresh_reports_ejections_that_began_or_ended() {
        let b = |port| Backend {
            ip: "10.0.0.1".parse().unwrap(),
            port,
        };
        let e = |port, remaining_ms| Ejection {
            id: u32::from(port),
            backend: b(port),
            proto: Proto::Tcp,
            remaining_ms,
            ejections: 1,
            failures: 0,
            failures_total: 5,
            successes_total: 0,
            threshold: 5,
            base_ms: 30_000,
        };
        let mut s = Scheduling::default();
        assert_eq!(s.refresh(&[e(1, 100), e(2, 0)]), [b(1)].into());
        assert!(s.next_readmission.is_some());
        assert!(s.refresh(&[e(1, 50), e(2, 0)]).is_empty());
        assert_eq!(s.refresh(&[e(1, 0), e(2, 0)]), [b(1)].into());
        assert!(s.next_readmission.is_none());
    }
}
