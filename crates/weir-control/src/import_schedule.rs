//! A ServiceImport's backends as its GlobalTrafficPolicy schedules them: the endpoints of every
//! exporting cluster, grouped into the policy's levels, with the endpoints the datapath has
//! ejected counted unhealthy (at most `maxEjectionPercent` of a level), and each backend
//! weighted by its cluster's share ([`crate::schedule`]) split equally among the endpoints
//! that carry it. Without a policy every ready endpoint not ejected is equal, as for any
//! Service. Pure; the agent passes the result to the dataplane.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::lb::{Backend, EndpointView, Outlier, Proto, Scheduled, Scheduler};
use crate::schedule::{ClusterShare, Level, OutlierSpec, PolicySpec, Properties};

/// A backend's weight when it alone carries all new connections (shares are in percent, so
/// a weight is a share in millionths).
pub const WEIGHT_SCALE: f64 = 10_000.0;

/// How one import's frontends are scheduled on this cluster.
#[derive(Debug, Clone, Default)]
pub struct ImportSchedule {
    /// The import's GlobalTrafficPolicy, if any.
    pub policy: Option<PolicySpec>,
    /// FailOver levels as the mesh placed them (the policy's status), used when the policy
    /// selects clusters by their ClusterProperties, which only the mesh knows.
    pub levels: Option<Vec<Vec<String>>>,
    /// This cluster's id.
    pub importer: String,
    /// Backends the datapath has ejected now.
    pub ejected: HashSet<Backend>,
}

/// One cluster's endpoints: (backend, ready), sorted.
type ClusterEndpoints = BTreeMap<String, Vec<(Backend, bool)>>;

impl ImportSchedule {
    /// Whether the policy places clusters by ClusterProperty (so the mesh's levels apply).
    fn by_property(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| {
            p.priorities.iter().any(|l| {
                l.selector
                    .as_ref()
                    .is_some_and(|s| !s.same_as_importer.is_empty())
            })
        })
    }

    /// The groups within which at most `maxEjectionPercent` may be ejected: the policy's
    /// levels (each ActiveActive cluster alone; every cluster together without a policy).
    fn ejection_groups(&self, names: &[String]) -> Vec<Vec<String>> {
        match &self.policy {
            None => vec![names.to_vec()],
            Some(p) if p.lb_type == "ActiveActive" => {
                names.iter().map(|n| vec![n.clone()]).collect()
            }
            Some(p) => self.levels_of(p, names),
        }
    }

    fn levels_of(&self, p: &PolicySpec, names: &[String]) -> Vec<Vec<String>> {
        match &self.levels {
            Some(l) if self.by_property() => l
                .iter()
                .map(|lv| lv.iter().filter(|c| names.contains(c)).cloned().collect())
                .collect(),
            _ => p.levels(&self.importer, &Properties::new(), names),
        }
    }

    /// The ejected backends that count: per group, the first `max%` of its listed endpoints.
    fn effective_ejections(
        &self,
        by_cluster: &ClusterEndpoints,
        max_percent: u32,
    ) -> BTreeSet<Backend> {
        let names: Vec<String> = by_cluster.keys().cloned().collect();
        let mut out = BTreeSet::new();
        for group in self.ejection_groups(&names) {
            let eps: Vec<&(Backend, bool)> = group
                .iter()
                .filter_map(|c| by_cluster.get(c))
                .flatten()
                .collect();
            let allowed = eps.len() * max_percent as usize / 100;
            out.extend(
                eps.iter()
                    .filter(|(b, ready)| *ready && self.ejected.contains(b))
                    .map(|(b, _)| *b)
                    .take(allowed),
            );
        }
        out
    }
}

impl Scheduler for ImportSchedule {
    fn select(&self, proto: Proto, endpoints: &[EndpointView]) -> Scheduled {
        let mut seen = HashSet::new();
        let mut by_cluster: ClusterEndpoints = BTreeMap::new();
        for e in endpoints {
            if seen.insert(e.backend()) {
                by_cluster
                    .entry(e.cluster.clone().unwrap_or_default())
                    .or_default()
                    .push((e.backend(), e.ready));
            }
        }
        for eps in by_cluster.values_mut() {
            eps.sort();
        }
        let od = self
            .policy
            .as_ref()
            .and_then(|p| p.outlier_detection.as_ref());
        let (failures, base_ms, max_percent) = OutlierSpec::settings(od);
        // Outcomes are counted for TCP connects only: a UDP frontend's backends are not
        // ejected with the TCP ones of the same address and port.
        let ejected = if proto == Proto::Tcp {
            self.effective_ejections(&by_cluster, max_percent)
        } else {
            BTreeSet::new()
        };
        let healthy = |(b, ready): &(Backend, bool)| *ready && !ejected.contains(b);
        let levels: Vec<(String, Level)> = by_cluster
            .iter()
            .map(|(c, eps)| {
                let total = eps.len() as u32;
                let healthy = eps.iter().filter(|e| healthy(e)).count() as u32;
                (c.clone(), Level { total, healthy })
            })
            .collect();
        let mut out = Scheduled {
            outlier: Some(Outlier {
                consecutive_failures: failures,
                base_ejection_ms: base_ms,
            }),
            ejected: ejected.iter().copied().collect(),
            ..Default::default()
        };
        let Some(policy) = &self.policy else {
            equal_shares(&by_cluster, &levels, &healthy, &mut out);
            if out.backends.is_empty() {
                // None ready: serving and terminating ones, as for a Service (KEP-1669).
                (out.backends, _) = crate::lb::select(endpoints, None);
            }
            out.standby = standby(&by_cluster, &out.backends);
            return out;
        };
        let names: Vec<String> = by_cluster.keys().cloned().collect();
        out.plan = policy.plan_in(&self.levels_of(policy, &names), &levels);
        let mut weighted: Vec<(Backend, u32)> = Vec::new();
        for share in out.plan.iter().filter(|s| s.percent > 0.0) {
            let carriers: Vec<Backend> = by_cluster[&share.cluster]
                .iter()
                .filter(|e| share.panic || healthy(e))
                .map(|(b, _)| *b)
                .collect();
            if carriers.is_empty() {
                continue;
            }
            let w = (share.percent * WEIGHT_SCALE / carriers.len() as f64).round() as u32;
            weighted.extend(carriers.into_iter().map(|b| (b, w.max(1))));
        }
        weighted.sort();
        (out.backends, out.weights) = weighted.into_iter().unzip();
        out.standby = standby(&by_cluster, &out.backends);
        out
    }
}

/// The listed endpoints not among `chosen` (sorted).
fn standby(by_cluster: &ClusterEndpoints, chosen: &[Backend]) -> Vec<Backend> {
    let mut out: Vec<Backend> = by_cluster
        .values()
        .flatten()
        .map(|(b, _)| *b)
        .filter(|b| chosen.binary_search(b).is_err())
        .collect();
    out.sort();
    out
}

/// No policy: every healthy endpoint equal (every ready one when all are ejected; serving and
/// terminating ones when none is ready, as for a Service).
fn equal_shares(
    by_cluster: &ClusterEndpoints,
    levels: &[(String, Level)],
    healthy: &dyn Fn(&(Backend, bool)) -> bool,
    out: &mut Scheduled,
) {
    let all: Vec<&(Backend, bool)> = by_cluster.values().flatten().collect();
    let mut backends: Vec<Backend> = all.iter().filter(|e| healthy(e)).map(|(b, _)| *b).collect();
    let mut why = "no GlobalTrafficPolicy: every ready endpoint equal";
    if backends.is_empty() {
        backends = all.iter().filter(|(_, r)| *r).map(|(b, _)| *b).collect();
        if !backends.is_empty() {
            why = "no GlobalTrafficPolicy: every endpoint ejected, so every ready one";
        }
    }
    backends.sort();
    let n = backends.len().max(1) as f64;
    out.plan = levels
        .iter()
        .map(|(c, l)| {
            let mine = by_cluster[c]
                .iter()
                .filter(|(b, _)| backends.binary_search(b).is_ok())
                .count();
            ClusterShare {
                cluster: c.clone(),
                endpoints: *l,
                level: None,
                percent: 100.0 * mine as f64 / n,
                panic: false,
                reason: why.into(),
            }
        })
        .collect();
    out.backends = backends;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ep(cluster: &str, i: u8, ready: bool) -> EndpointView {
        EndpointView {
            ip: IpAddr::from([10, 0, cluster.as_bytes()[1], i]),
            port: 80,
            ready,
            serving: ready,
            terminating: false,
            node: None,
            cluster: Some(cluster.into()),
        }
    }

    fn eps(cluster: &str, ready: usize, unready: usize) -> Vec<EndpointView> {
        (0..ready + unready)
            .map(|i| ep(cluster, i as u8, i < ready))
            .collect()
    }

    fn policy(v: serde_json::Value) -> Option<PolicySpec> {
        Some(serde_json::from_value(v).unwrap())
    }

    /// Each cluster's share of the total weight, in percent.
    fn shares(s: &Scheduled) -> BTreeMap<u8, f64> {
        let total: f64 = s.weights.iter().map(|w| f64::from(*w)).sum();
        let mut out = BTreeMap::new();
        for (b, w) in s.backends.iter().zip(&s.weights) {
            let IpAddr::V4(a) = b.ip else { unreachable!() };
            *out.entry(a.octets()[2]).or_default() += 100.0 * f64::from(*w) / total;
        }
        out
    }

    #[test]
    fn failover_keeps_seventy_percent_local_with_half_the_local_endpoints_unready() {
        let mut e = eps("c1", 5, 5);
        e.extend(eps("c2", 4, 0));
        let s = ImportSchedule {
            policy: policy(serde_json::json!({"lbType": "FailOver"})),
            importer: "c1".into(),
            ..Default::default()
        };
        let out = s.select(Proto::Tcp, &e);
        assert_eq!(out.backends.len(), 9, "unready endpoints carry nothing");
        assert_eq!(out.standby.len(), 5, "but stay for their connections");
        let sh = shares(&out);
        assert!((sh[&b'1'] - 70.0).abs() < 0.01, "{sh:?}");
        assert!((sh[&b'2'] - 30.0).abs() < 0.01, "{sh:?}");
        assert_eq!(out.outlier.unwrap().consecutive_failures, 5);
    }

    #[test]
    fn ejected_endpoints_count_unhealthy_up_to_max_ejection_percent() {
        let mut e = eps("c1", 4, 0);
        e.extend(eps("c2", 4, 0));
        let local: Vec<Backend> = e[..4].iter().map(EndpointView::backend).collect();
        let mut s = ImportSchedule {
            policy: policy(serde_json::json!({"lbType": "FailOver"})),
            importer: "c1".into(),
            ejected: local.iter().copied().collect(),
            ..Default::default()
        };
        let out = s.select(Proto::Tcp, &e);
        assert_eq!(
            shares(&out).get(&b'1'),
            None,
            "all local ejected: all remote"
        );
        assert_eq!(out.ejected.len(), 4);
        s.policy = policy(serde_json::json!({"lbType": "FailOver",
            "outlierDetection": {"maxEjectionPercent": 50, "baseEjectionTime": "2s"}}));
        let out = s.select(Proto::Tcp, &e);
        assert_eq!(out.ejected.len(), 2, "at most half of the level");
        assert_eq!(out.outlier.unwrap().base_ejection_ms, 2000);
        assert!((shares(&out)[&b'1'] - 70.0).abs() < 0.01);
    }

    #[test]
    fn active_active_and_locality() {
        let mut e = eps("c2", 3, 0);
        e.extend(eps("c3", 2, 0));
        let s = ImportSchedule {
            policy: policy(serde_json::json!({"lbType": "ActiveActive",
                "targets": [{"cluster": "c2", "weight": 80}, {"cluster": "c3", "weight": 20}]})),
            importer: "c1".into(),
            ..Default::default()
        };
        let sh = shares(&s.select(Proto::Tcp, &e));
        assert!((sh[&b'2'] - 80.0).abs() < 0.01 && (sh[&b'3'] - 20.0).abs() < 0.01);
        let s = ImportSchedule {
            policy: policy(serde_json::json!({"lbType": "Locality"})),
            importer: "c1".into(),
            ..Default::default()
        };
        assert!(
            s.select(Proto::Tcp, &e).backends.is_empty(),
            "no local endpoint: refused"
        );
    }

    #[test]
    fn without_a_policy_every_healthy_endpoint_is_equal() {
        let mut e = eps("c1", 2, 1);
        e.extend(eps("c2", 2, 0));
        let mut s = ImportSchedule::default();
        let out = s.select(Proto::Tcp, &e);
        assert_eq!(out.backends.len(), 4);
        assert!(out.weights.is_empty());
        s.ejected = e.iter().map(EndpointView::backend).collect();
        assert_eq!(
            s.select(Proto::Tcp, &e).backends.len(),
            4,
            "all ejected: every ready one"
        );
        // UDP frontends do not take the ejections of TCP connects.
        s.ejected = [e[0].backend()].into();
        assert_eq!(s.select(Proto::Udp, &e).backends.len(), 4);
        assert_eq!(s.select(Proto::Tcp, &e).backends.len(), 3);
        // None ready: serving and terminating ones, as for a Service.
        let mut t = eps("c2", 0, 2);
        for x in &mut t {
            (x.serving, x.terminating) = (true, true);
        }
        let out = ImportSchedule::default().select(Proto::Tcp, &t);
        assert_eq!((out.backends.len(), out.standby.len()), (2, 0));
    }

    #[test]
    fn build_with_weights_an_imports_frontend_by_source_cluster() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hello@clusterset", "namespace": "mcs"},
            "spec": {"clusterIP": "10.90.0.1", "clusterIPs": ["10.90.0.1"],
                     "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"}]}}))
        .unwrap();
        let slice = |cluster: &str,
                     eps: serde_json::Value|
         -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("hello-{cluster}"), "namespace": "mcs",
                    "labels": {"kubernetes.io/service-name": "hello@clusterset",
                               "multicluster.kubernetes.io/source-cluster": cluster}},
                "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps}))
            .unwrap()
        };
        let slices = [
            slice(
                "c1",
                serde_json::json!([{"addresses": ["10.244.1.2"]},
                {"addresses": ["10.244.1.3"], "conditions": {"ready": false}}]),
            ),
            slice("c2", serde_json::json!([{"addresses": ["10.245.1.2"]}])),
        ];
        let opts = crate::lb::Options {
            node_name: "node-1".into(),
            default_algorithm: crate::lb::Algorithm::Random,
            default_mode: crate::lb::LbMode::Snat,
        };
        let s = ImportSchedule {
            policy: policy(serde_json::json!({"lbType": "ActiveActive",
                "targets": [{"cluster": "c1", "weight": 3}, {"cluster": "c2", "weight": 1}]})),
            importer: "c1".into(),
            ..Default::default()
        };
        let (st, _, chosen) = crate::lb::build_with(&[svc], &slices, &opts, Some(&s));
        let f = st.frontends.values().next().unwrap();
        let got: Vec<(String, u32)> = f
            .backends
            .iter()
            .map(|b| b.to_string())
            .zip(f.weights.iter().copied())
            .collect();
        // c1 at 1 of 2 healthy: availability min(100, 70) = 70; 3 x 70 : 1 x 100 -> 67 : 32
        // in Envoy's integer percents, the left-over point to the first: 68 : 32.
        assert_eq!(
            got,
            [
                ("10.244.1.2:8080".to_string(), 680_000),
                ("10.245.1.2:8080".into(), 320_000)
            ]
        );
        assert_eq!(
            f.standby.len(),
            1,
            "the unready endpoint stays for its connections"
        );
        assert!(f.outlier.is_some());
        assert_eq!(chosen.values().next().unwrap().plan.len(), 2);
    }

    #[test]
    fn levels_from_the_mesh_place_clusters_by_property() {
        let mut e = eps("c1", 1, 1);
        e.extend(eps("c2", 2, 0));
        e.extend(eps("c3", 2, 0));
        let s = ImportSchedule {
            policy: policy(
                serde_json::json!({"lbType": "FailOver", "panicThreshold": 0,
                "priorities": [{"clusters": ["c1"]},
                    {"selector": {"sameAsImporter": ["region.weir.dev"]}}, {"selector": {}}]}),
            ),
            levels: Some(vec![
                vec!["c1".into()],
                vec!["c3".into()],
                vec!["c2".into()],
            ]),
            importer: "c1".into(),
            ..Default::default()
        };
        let sh = shares(&s.select(Proto::Tcp, &e));
        // c1 at 50% healthy -> 70%; the rest to c3 (same region), none to c2.
        assert!((sh[&b'1'] - 70.0).abs() < 0.01, "{sh:?}");
        assert!((sh[&b'3'] - 30.0).abs() < 0.01, "{sh:?}");
        assert_eq!(sh.get(&b'2'), None);
    }
}
