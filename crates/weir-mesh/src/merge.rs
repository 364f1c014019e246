//! The clusterset's view of a Service from every cluster's export of it, as KEP-1645 rules:
//! the oldest ServiceExport (by creationTimestamp) wins every clusterset-wide property, the
//! ports are the union (merged by name, then by protocol and port), and every constituent
//! export learns of a conflict. Pure functions; the mesh writes their results.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::{ExportRecord, PortRecord};

/// The merged view of one exported Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Headless (type Headless) or not (type ClusterSetIP).
    pub headless: bool,
    /// The union of the exports' ports, the oldest export's first.
    pub ports: Vec<PortRecord>,
    /// The oldest export's IP families.
    pub ip_families: Vec<String>,
    /// The oldest export's session affinity.
    pub session_affinity: String,
    /// Its sessionAffinityConfig.
    pub session_affinity_config: Option<serde_json::Value>,
    /// Its internalTrafficPolicy.
    pub internal_traffic_policy: Option<String>,
    /// Its trafficDistribution.
    pub traffic_distribution: Option<String>,
    /// The oldest export's exportedLabels, for the ServiceImport.
    pub labels: BTreeMap<String, String>,
    /// The oldest export's exportedAnnotations, for the ServiceImport.
    pub annotations: BTreeMap<String, String>,
    /// The exporting clusters, sorted.
    pub clusters: Vec<String>,
    /// The cluster whose export won (the oldest).
    pub winner: String,
    /// Conflict reasons (KEP-1645's, e.g. `PortConflict`), empty when the exports agree.
    pub conflicts: Vec<&'static str>,
    /// What conflicts and who won, for the Conflict condition's message.
    pub message: String,
}

fn sorted_ports(p: &[PortRecord]) -> Vec<PortRecord> {
    let mut v = p.to_vec();
    v.sort();
    v
}

/// Merges every cluster's export of one Service (None when there is none). Exports are
/// ordered by creationTimestamp, then cluster id, so every mesh reaches the same result.
pub fn merge(exports: &[&ExportRecord]) -> Option<Merged> {
    let mut ordered: Vec<&ExportRecord> = exports.to_vec();
    // An export without a readable creation time sorts last: it cannot claim to be oldest.
    let when = |e: &ExportRecord| {
        e.created
            .parse::<jiff::Timestamp>()
            .unwrap_or(jiff::Timestamp::MAX)
    };
    ordered.sort_by(|a, b| {
        when(a)
            .cmp(&when(b))
            .then_with(|| a.cluster.cmp(&b.cluster))
    });
    let first = *ordered.first()?;
    let mut ports = first.ports.clone();
    let mut conflicts: BTreeSet<&'static str> = BTreeSet::new();
    let mut fields: BTreeSet<&'static str> = BTreeSet::new();
    for e in &ordered[1..] {
        for p in &e.ports {
            let by_name = ports.iter().any(|u| u.name == p.name);
            let by_number = ports
                .iter()
                .any(|u| u.protocol == p.protocol && u.port == p.port);
            if !by_name && !by_number {
                ports.push(p.clone());
            }
        }
        let mut check = |differs: bool, reason: &'static str, field: &'static str| {
            if differs {
                conflicts.insert(reason);
                fields.insert(field);
            }
        };
        check(
            sorted_ports(&e.ports) != sorted_ports(&first.ports),
            "PortConflict",
            "ports",
        );
        check(e.headless != first.headless, "TypeConflict", "type");
        check(
            e.session_affinity != first.session_affinity,
            "SessionAffinityConflict",
            "sessionAffinity",
        );
        check(
            e.session_affinity_config != first.session_affinity_config,
            "SessionAffinityConfigConflict",
            "sessionAffinityConfig",
        );
        check(
            e.internal_traffic_policy != first.internal_traffic_policy,
            "InternalTrafficPolicyConflict",
            "internalTrafficPolicy",
        );
        check(
            e.traffic_distribution != first.traffic_distribution,
            "TrafficDistributionConflict",
            "trafficDistribution",
        );
        check(
            e.ip_families != first.ip_families,
            "IPFamilyConflict",
            "ipFamilies",
        );
        check(
            e.exported_labels != first.exported_labels,
            "LabelsConflict",
            "exportedLabels",
        );
        check(
            e.exported_annotations != first.exported_annotations,
            "AnnotationsConflict",
            "exportedAnnotations",
        );
    }
    let mut clusters: Vec<String> = ordered.iter().map(|e| e.cluster.clone()).collect();
    clusters.sort();
    let message = if conflicts.is_empty() {
        "no conflicts among the exports".to_string()
    } else {
        format!(
            "the exports differ in {}; the oldest export (cluster {}, created {}) wins and the ports are the union of all",
            fields.into_iter().collect::<Vec<_>>().join(", "),
            first.cluster,
            first.created
        )
    };
    Some(Merged {
        namespace: first.namespace.clone(),
        name: first.name.clone(),
        headless: first.headless,
        ports,
        ip_families: first.ip_families.clone(),
        session_affinity: first.session_affinity.clone(),
        session_affinity_config: first.session_affinity_config.clone(),
        internal_traffic_policy: first.internal_traffic_policy.clone(),
        traffic_distribution: first.traffic_distribution.clone(),
        labels: first.exported_labels.clone(),
        annotations: first.exported_annotations.clone(),
        clusters,
        winner: first.cluster.clone(),
        conflicts: conflicts.into_iter().collect(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, proto: &str, n: i32) -> PortRecord {
        PortRecord {
            name: name.into(),
            protocol: proto.into(),
            port: n,
            app_protocol: None,
        }
    }

    fn export(cluster: &str, created: &str, ports: Vec<PortRecord>) -> ExportRecord {
        ExportRecord {
            cluster: cluster.into(),
            namespace: "mcs".into(),
            name: "hello".into(),
            created: created.into(),
            headless: false,
            ports,
            ip_families: vec!["IPv4".into()],
            session_affinity: "None".into(),
            session_affinity_config: None,
            internal_traffic_policy: Some("Cluster".into()),
            traffic_distribution: None,
            slices: vec![],
            exported_labels: Default::default(),
            exported_annotations: Default::default(),
        }
    }

    #[test]
    fn identical_exports_do_not_conflict() {
        let a = export("c1", "2026-01-01T00:00:00Z", vec![port("tcp", "TCP", 42)]);
        let b = export("c2", "2026-01-01T00:00:01Z", vec![port("tcp", "TCP", 42)]);
        let m = merge(&[&b, &a]).unwrap();
        assert!(m.conflicts.is_empty());
        assert_eq!(m.clusters, ["c1", "c2"]);
        assert_eq!(m.winner, "c1");
    }

    /// The conformance suite's port union: tcp/42 + udp/42 and tcp/42 + sctp/142 give all
    /// three, and a conflict on both exports.
    #[test]
    fn ports_are_the_union_and_any_difference_conflicts() {
        let a = export(
            "c1",
            "2026-01-01T00:00:00Z",
            vec![port("tcp", "TCP", 42), port("udp", "UDP", 42)],
        );
        let b = export(
            "c2",
            "2026-01-01T00:00:05Z",
            vec![port("tcp", "TCP", 42), port("stcp", "SCTP", 142)],
        );
        let m = merge(&[&a, &b]).unwrap();
        assert_eq!(
            m.ports,
            [
                port("tcp", "TCP", 42),
                port("udp", "UDP", 42),
                port("stcp", "SCTP", 142)
            ]
        );
        assert_eq!(m.conflicts, ["PortConflict"]);
        // A subset is a conflict too (the ports are not identical).
        let c = export("c3", "2026-01-01T00:00:09Z", vec![port("tcp", "TCP", 42)]);
        assert_eq!(merge(&[&a, &c]).unwrap().conflicts, ["PortConflict"]);
    }

    /// The oldest wins a port's number, whatever order the exports come in.
    #[test]
    fn oldest_export_wins() {
        let old = export("c2", "2026-01-01T00:00:00Z", vec![port("tcp", "TCP", 42)]);
        let mut new = export("c1", "2026-01-02T00:00:00Z", vec![port("tcp", "TCP", 43)]);
        new.headless = true;
        new.session_affinity = "ClientIP".into();
        let m = merge(&[&new, &old]).unwrap();
        assert_eq!(m.ports, [port("tcp", "TCP", 42)]);
        assert!(!m.headless);
        assert_eq!(m.session_affinity, "None");
        assert_eq!(m.winner, "c2");
        assert_eq!(
            m.conflicts,
            ["PortConflict", "SessionAffinityConflict", "TypeConflict"]
        );
        assert!(m.message.contains("cluster c2"), "{}", m.message);
    }

    #[test]
    fn an_unreadable_creation_time_never_wins() {
        let bad = export("c1", "", vec![port("tcp", "TCP", 1)]);
        let good = export("c2", "2026-01-01T00:00:00Z", vec![port("tcp", "TCP", 2)]);
        assert_eq!(merge(&[&bad, &good]).unwrap().winner, "c2");
    }

    #[test]
    fn exported_labels_and_annotations_come_from_the_oldest_export() {
        let mut a = export("c1", "2026-01-01T00:00:00Z", vec![port("tcp", "TCP", 42)]);
        a.exported_labels
            .insert("dummy-label".into(), "true".into());
        a.exported_annotations
            .insert("dummy-annotation".into(), "true".into());
        let mut b = a.clone();
        b.cluster = "c2".into();
        b.created = "2026-01-01T00:00:01Z".into();
        let m = merge(&[&b, &a]).unwrap();
        assert!(m.conflicts.is_empty());
        assert_eq!(m.labels, a.exported_labels);
        b.exported_labels = [("dummy-label2".to_string(), "true".to_string())].into();
        b.exported_annotations = [("dummy-annotation2".to_string(), "true".to_string())].into();
        let m = merge(&[&b, &a]).unwrap();
        assert_eq!(m.conflicts, ["AnnotationsConflict", "LabelsConflict"]);
        assert_eq!(m.labels, a.exported_labels);
        assert_eq!(m.annotations, a.exported_annotations);
        assert!(m.message.contains("exportedLabels"), "{}", m.message);
    }

    #[test]
    fn nothing_to_merge() {
        assert_eq!(merge(&[]), None);
    }
}
