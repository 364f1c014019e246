//! GlobalTrafficPolicy status: the share of new connections each exporting cluster gets now
//! for this cluster's clients, and why (`weir_control::schedule`), from the endpoints the
//! clusters publish (listed, and ready). Pure; the mesh writes it.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Value};
use weir_control::schedule::{Level, PolicySpec, Properties, ShareRow};

use crate::record::ExportRecord;

/// A cluster's endpoints in its export: every one listed, and the ready ones.
pub fn endpoints(r: &ExportRecord) -> Level {
    let mut l = Level::default();
    for s in &r.slices {
        for e in &s.endpoints {
            l.total += 1;
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if ready {
                l.healthy += 1;
            }
        }
    }
    l
}

/// The clusters a policy names (targets and priority levels).
fn named_clusters(spec: &PolicySpec) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = spec.targets.iter().map(|t| t.cluster.clone()).collect();
    for p in &spec.priorities {
        out.extend(p.clusters.iter().flatten().cloned());
    }
    out
}

/// The status of a policy `spec` for the clients of cluster `importer`: per exporting cluster
/// (from `records`, the import's exports) its endpoints, level, share and reason; conditions
/// `Accepted` and `ClustersKnown` (False, naming them, when the policy names clusters that are
/// not in the clusterset `members`). Conditions carry no transition times.
pub fn status(
    spec: &Value,
    importer: &str,
    members: &BTreeSet<String>,
    props: &Properties,
    records: &[Arc<ExportRecord>],
) -> Value {
    let spec: PolicySpec = match serde_json::from_value(spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            return json!({"clusters": [], "conditions": [
                {"type": "Accepted", "status": "False", "reason": "Invalid", "message": e.to_string()}]})
        }
    };
    let mut clusters: Vec<(String, Level)> = records
        .iter()
        .map(|r| (r.cluster.clone(), endpoints(r)))
        .collect();
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    let plan = spec.plan(importer, props, &clusters);
    let rows: Vec<ShareRow> = plan.iter().map(ShareRow::from).collect();
    let unknown: Vec<String> = named_clusters(&spec)
        .into_iter()
        .filter(|c| !members.contains(c))
        .collect();
    let known = if unknown.is_empty() {
        json!({"type": "ClustersKnown", "status": "True", "reason": "AllKnown",
               "message": "every cluster the policy names is in the clusterset"})
    } else {
        json!({"type": "ClustersKnown", "status": "False", "reason": "UnknownClusters",
               "message": format!("not in the clusterset: {}", unknown.join(", "))})
    };
    json!({"clusters": rows, "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted",
         "message": format!("{} for the clients of cluster {importer}", spec.lb_type)},
        known]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cluster: &str, ready: &[bool]) -> Arc<ExportRecord> {
        let eps: Vec<Value> = ready
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"addresses": [format!("10.0.0.{i}")], "conditions": {"ready": r}}))
            .collect();
        Arc::new(
            serde_json::from_value(
                json!({"cluster": cluster, "namespace": "mcs", "name": "hello",
                "created": "", "headless": false, "ports": [],
                "slices": [{"addressType": "IPv4", "endpoints": eps}]}),
            )
            .unwrap(),
        )
    }

    #[test]
    fn shares_per_cluster_with_reasons_and_unknown_clusters() {
        let members: BTreeSet<String> = ["c1".to_string(), "c2".into()].into();
        let mut ready = vec![true; 5];
        ready.extend([false; 5]);
        let records = [rec("c2", &[true; 4]), rec("c1", &ready)];
        let spec = json!({"lbType": "FailOver", "priorities": [{"clusters": ["c1"]}, {"clusters": ["c2", "c9"]}]});
        let st = status(&spec, "c1", &members, &Properties::new(), &records);
        let rows = st["clusters"].as_array().unwrap();
        assert_eq!(rows[0]["cluster"], "c1");
        assert_eq!(
            (rows[0]["healthy"].as_u64(), rows[0]["total"].as_u64()),
            (Some(5), Some(10))
        );
        assert_eq!(rows[0]["share"], 70.0);
        assert_eq!(rows[1]["share"], 30.0);
        assert_eq!(rows[1]["level"], 1);
        assert_eq!(st["conditions"][1]["status"], "False");
        assert!(st["conditions"][1]["message"]
            .as_str()
            .unwrap()
            .contains("c9"));
    }
}
