//! The resource kinds weir serves, with the names Kubernetes clients use for them.

/// One resource type of the Kubernetes API (a kind at a group/version, with its REST names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Kind, e.g. `Service`.
    pub kind: &'static str,
    /// Plural resource name used in URLs, e.g. `services`.
    pub plural: &'static str,
    /// Singular resource name, e.g. `service`.
    pub singular: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Whether the kind has a `/status` subresource (status is written separately from spec).
    pub has_status: bool,
}

impl ResourceKind {
    /// `apiVersion` as written in objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Kind of the list object, e.g. `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// URL prefix of the group version: `/api/v1` or `/apis/group/version`.
    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// URL of the collection, in namespace `ns` for namespaced kinds.
    pub fn collection_path(&self, ns: Option<&str>) -> String {
        match (self.namespaced, ns) {
            (true, Some(ns)) => format!(
                "{}/namespaces/{}/{}",
                self.group_version_path(),
                ns,
                self.plural
            ),
            _ => format!("{}/{}", self.group_version_path(), self.plural),
        }
    }

    /// URL of one object.
    pub fn object_path(&self, ns: Option<&str>, name: &str) -> String {
        format!("{}/{}", self.collection_path(ns), name)
    }
}

/// Core group: Namespace.
pub const NAMESPACE: ResourceKind = ResourceKind {
    group: "",
    version: "v1",
    kind: "Namespace",
    plural: "namespaces",
    singular: "namespace",
    namespaced: false,
    short_names: &["ns"],
    has_status: true,
};
/// Core group: Pod.
pub const POD: ResourceKind = ResourceKind {
    group: "",
    version: "v1",
    kind: "Pod",
    plural: "pods",
    singular: "pod",
    namespaced: true,
    short_names: &["po"],
    has_status: true,
};
/// Core group: Service.
pub const SERVICE: ResourceKind = ResourceKind {
    group: "",
    version: "v1",
    kind: "Service",
    plural: "services",
    singular: "service",
    namespaced: true,
    short_names: &["svc"],
    has_status: true,
};
/// Core group: Node.
pub const NODE: ResourceKind = ResourceKind {
    group: "",
    version: "v1",
    kind: "Node",
    plural: "nodes",
    singular: "node",
    namespaced: false,
    short_names: &["no"],
    has_status: true,
};
/// discovery.k8s.io/v1 EndpointSlice.
pub const ENDPOINT_SLICE: ResourceKind = ResourceKind {
    group: "discovery.k8s.io",
    version: "v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    singular: "endpointslice",
    namespaced: true,
    short_names: &[],
    has_status: false,
};
/// networking.k8s.io/v1 NetworkPolicy.
pub const NETWORK_POLICY: ResourceKind = ResourceKind {
    group: "networking.k8s.io",
    version: "v1",
    kind: "NetworkPolicy",
    plural: "networkpolicies",
    singular: "networkpolicy",
    namespaced: true,
    short_names: &["netpol"],
    has_status: false,
};

/// weir.dev/v1alpha1 SecurityIdentity: the numeric security identity (the object's name)
/// of a set of pod and namespace labels, allocated cluster-wide by the agents (a
/// CustomResourceDefinition on a real cluster, as Cilium's CiliumIdentity).
pub const SECURITY_IDENTITY: ResourceKind = ResourceKind {
    group: "weir.dev",
    version: "v1alpha1",
    kind: "SecurityIdentity",
    plural: "securityidentities",
    singular: "securityidentity",
    namespaced: false,
    short_names: &["wid"],
    has_status: false,
};

/// weir.dev/v1alpha1 RemoteEndpoint: a pod of another cluster of the clusterset (its
/// addresses, labels and namespace labels), written by the cluster's mesh so that the
/// agents' NetworkPolicy judges remote peers by their identity (as Cilium's clustermesh
/// shares endpoints and identities). Cluster-scoped, named `<cluster>.<namespace>.<pod>`.
pub const REMOTE_ENDPOINT: ResourceKind = ResourceKind {
    group: "weir.dev",
    version: "v1alpha1",
    kind: "RemoteEndpoint",
    plural: "remoteendpoints",
    singular: "remoteendpoint",
    namespaced: false,
    short_names: &["rep"],
    has_status: false,
};

/// weir.dev/v1alpha1 RemoteNode: a node of another cluster of the clusterset (its addresses
/// and pod CIDRs), written by the cluster's mesh so that the agents route (or tunnel) to its
/// pods and leave flows to them unmasqueraded. Cluster-scoped, named `<cluster>.<node>`.
pub const REMOTE_NODE: ResourceKind = ResourceKind {
    group: "weir.dev",
    version: "v1alpha1",
    kind: "RemoteNode",
    plural: "remotenodes",
    singular: "remotenode",
    namespaced: false,
    short_names: &["rnode"],
    has_status: false,
};

/// weir.dev/v1alpha1 GlobalTrafficPolicy: how the clients of the cluster it is created in
/// spread new connections to the ServiceImport of the same name over the exporting clusters
/// (Locality, FailOver by priority levels, ActiveActive by weights). Namespaced.
pub const GLOBAL_TRAFFIC_POLICY: ResourceKind = ResourceKind {
    group: "weir.dev",
    version: "v1alpha1",
    kind: "GlobalTrafficPolicy",
    plural: "globaltrafficpolicies",
    singular: "globaltrafficpolicy",
    namespaced: true,
    short_names: &["gtp"],
    has_status: true,
};

/// multicluster.x-k8s.io ServiceExport (KEP-1645; the mcs-api CRD's storage version). The
/// same objects are served as v1alpha1 too: the two versions' schemas are identical.
pub const SERVICE_EXPORT: ResourceKind = ResourceKind {
    group: "multicluster.x-k8s.io",
    version: "v1beta1",
    kind: "ServiceExport",
    plural: "serviceexports",
    singular: "serviceexport",
    namespaced: true,
    short_names: &["svcex", "svcexport"],
    has_status: true,
};
/// ServiceExport as multicluster.x-k8s.io/v1alpha1.
pub const SERVICE_EXPORT_V1ALPHA1: ResourceKind = ResourceKind {
    version: "v1alpha1",
    ..SERVICE_EXPORT
};
/// multicluster.x-k8s.io ServiceImport (KEP-1645): a Service as the clusterset sees it.
pub const SERVICE_IMPORT: ResourceKind = ResourceKind {
    group: "multicluster.x-k8s.io",
    version: "v1beta1",
    kind: "ServiceImport",
    plural: "serviceimports",
    singular: "serviceimport",
    namespaced: true,
    short_names: &["svcim", "svcimport"],
    has_status: true,
};
/// ServiceImport as multicluster.x-k8s.io/v1alpha1.
pub const SERVICE_IMPORT_V1ALPHA1: ResourceKind = ResourceKind {
    version: "v1alpha1",
    ..SERVICE_IMPORT
};
/// about.k8s.io ClusterProperty (KEP-2149): a property of the cluster, such as its id in a
/// clusterset (`cluster.clusterset.k8s.io`).
pub const CLUSTER_PROPERTY: ResourceKind = ResourceKind {
    group: "about.k8s.io",
    version: "v1beta1",
    kind: "ClusterProperty",
    plural: "clusterproperties",
    singular: "clusterproperty",
    namespaced: false,
    short_names: &[],
    has_status: true,
};
/// ClusterProperty as about.k8s.io/v1alpha1.
pub const CLUSTER_PROPERTY_V1ALPHA1: ResourceKind = ResourceKind {
    version: "v1alpha1",
    ..CLUSTER_PROPERTY
};

/// Every kind the API server serves, in the order `get all`-style listings use. A kind served
/// in several versions is listed once per version, the preferred (storage) version first;
/// objects are stored once per kind, and each version shows them with its own `apiVersion`.
pub const ALL: &[ResourceKind] = &[
    NAMESPACE,
    NODE,
    POD,
    SERVICE,
    ENDPOINT_SLICE,
    NETWORK_POLICY,
    SECURITY_IDENTITY,
    REMOTE_ENDPOINT,
    REMOTE_NODE,
    GLOBAL_TRAFFIC_POLICY,
    SERVICE_EXPORT,
    SERVICE_EXPORT_V1ALPHA1,
    SERVICE_IMPORT,
    SERVICE_IMPORT_V1ALPHA1,
    CLUSTER_PROPERTY,
    CLUSTER_PROPERTY_V1ALPHA1,
];

/// The version a kind's objects are stored in: the first (preferred) of its served versions.
pub fn storage_version(kind: &ResourceKind) -> &'static ResourceKind {
    ALL.iter()
        .find(|k| k.group == kind.group && k.kind == kind.kind)
        .expect("a served kind")
}

/// The kind served at `group/version/plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    ALL.iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The kind an object declares with `apiVersion` and `kind`.
pub fn by_api_version_kind(api_version: &str, kind: &str) -> Option<&'static ResourceKind> {
    ALL.iter()
        .find(|k| k.api_version() == api_version && k.kind == kind)
}

/// The kind a user names on the command line: plural, singular, short name, kind, or
/// `plural.group` (case-insensitive), as kubectl resolves them.
pub fn by_cli_name(name: &str) -> Option<&'static ResourceKind> {
    let lower = name.to_ascii_lowercase();
    let (base, group) = match lower.split_once('.') {
        Some((b, g)) => (b.to_string(), Some(g.to_string())),
        None => (lower.clone(), None),
    };
    ALL.iter().find(|k| {
        let name_ok = k.plural == base
            || k.singular == base
            || k.kind.eq_ignore_ascii_case(&base)
            || k.short_names.contains(&base.as_str());
        let group_ok = match &group {
            None => true,
            Some(g) => k.group == g || (g == "core" && k.group.is_empty()),
        };
        name_ok && group_ok
    })
}

/// Group/versions served, for discovery: (group, version).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for k in ALL {
        if !out.contains(&(k.group, k.version)) {
            out.push((k.group, k.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CustomResourceDefinition and the agent's ClusterRole for real clusters (deploy/)
    /// describe the kind the lab's API server serves.
    #[test]
    fn the_security_identity_crd_and_the_agent_role_match_the_kind() {
        let k = SECURITY_IDENTITY;
        let crd: serde_json::Value =
            serde_yaml::from_str(include_str!("../../../deploy/securityidentity-crd.yaml"))
                .expect("CRD YAML");
        assert_eq!(crd["metadata"]["name"], format!("{}.{}", k.plural, k.group));
        let spec = &crd["spec"];
        assert_eq!(spec["group"], k.group);
        assert_eq!(
            spec["scope"],
            if k.namespaced {
                "Namespaced"
            } else {
                "Cluster"
            }
        );
        assert_eq!(spec["names"]["kind"], k.kind);
        assert_eq!(spec["names"]["plural"], k.plural);
        assert_eq!(spec["names"]["singular"], k.singular);
        assert_eq!(
            spec["names"]["shortNames"],
            serde_json::json!(k.short_names)
        );
        let version = &spec["versions"][0];
        assert_eq!(version["name"], k.version);
        let fields = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(fields["required"], serde_json::json!(["namespace"]));
        for f in ["namespace", "namespaceLabels", "podLabels"] {
            assert!(fields["properties"][f].is_object(), "{f}");
        }

        let docs: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(include_str!("../../../deploy/agent-rbac.yaml"))
                .map(|d| serde::Deserialize::deserialize(d).expect("RBAC YAML"))
                .collect();
        let role = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRole")
            .expect("ClusterRole");
        let grants = |group: &str, plural: &str, verb: &str| {
            role["rules"].as_array().unwrap().iter().any(|r| {
                r["apiGroups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g == group)
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p == plural)
                    && r["verbs"].as_array().unwrap().iter().any(|v| v == verb)
            })
        };
        for kind in [
            SERVICE,
            ENDPOINT_SLICE,
            NODE,
            POD,
            NAMESPACE,
            NETWORK_POLICY,
            k,
        ] {
            for verb in ["get", "list", "watch"] {
                assert!(
                    grants(kind.group, kind.plural, verb),
                    "{} {verb}",
                    kind.plural
                );
            }
        }
        assert!(grants(k.group, k.plural, "create") && grants(k.group, k.plural, "delete"));
    }

    /// The multi-cluster CRDs for real clusters (deploy/) describe the kinds as the API server
    /// serves them: names, scope, short names, every version (the storage one preferred),
    /// the status subresource and the printer columns.
    #[test]
    fn the_multicluster_crds_match_the_kinds() {
        for (file, text) in [
            (
                "serviceexport",
                include_str!("../../../deploy/serviceexport-crd.yaml"),
            ),
            (
                "serviceimport",
                include_str!("../../../deploy/serviceimport-crd.yaml"),
            ),
            (
                "clusterproperty",
                include_str!("../../../deploy/clusterproperty-crd.yaml"),
            ),
        ] {
            let crd: serde_json::Value = serde_yaml::from_str(text).expect("CRD YAML");
            let spec = &crd["spec"];
            let served: Vec<&ResourceKind> = ALL
                .iter()
                .filter(|k| k.group == spec["group"] && k.kind == spec["names"]["kind"])
                .collect();
            assert!(!served.is_empty(), "{file}: no kind served");
            let k = served[0];
            assert_eq!(crd["metadata"]["name"], format!("{}.{}", k.plural, k.group));
            assert_eq!(spec["names"]["plural"], k.plural);
            assert_eq!(spec["names"]["singular"], k.singular);
            assert_eq!(
                spec["names"]["shortNames"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                k.short_names
                    .iter()
                    .map(|s| serde_json::json!(s))
                    .collect::<Vec<_>>()
            );
            assert_eq!(
                spec["scope"],
                if k.namespaced {
                    "Namespaced"
                } else {
                    "Cluster"
                }
            );
            let versions = spec["versions"].as_array().unwrap();
            assert_eq!(versions.len(), served.len(), "{file}");
            for v in versions {
                let name = v["name"].as_str().unwrap();
                assert!(served.iter().any(|s| s.version == name), "{file} {name}");
                assert_eq!(v["storage"], name == k.version, "{file} {name}: storage");
                assert_eq!(v["subresources"].get("status").is_some(), k.has_status);
                let cols: Vec<String> = v["additionalPrinterColumns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["name"].as_str().unwrap().to_string())
                    .collect();
                let ours: Vec<String> = crate::print::columns(k)
                    .iter()
                    .skip(1)
                    .map(|c| c.name.to_string())
                    .collect();
                assert_eq!(cols, ours, "{file} {name}: columns");
            }
        }
        // kubectl's names resolve to the preferred version.
        assert_eq!(by_cli_name("svcex").unwrap().version, "v1beta1");
        assert_eq!(by_cli_name("serviceimports").unwrap().version, "v1beta1");
        assert_eq!(by_cli_name("clusterproperty").unwrap().version, "v1beta1");
    }

    #[test]
    fn resolves_cli_names_like_kubectl() {
        assert_eq!(by_cli_name("po").unwrap().kind, "Pod");
        assert_eq!(by_cli_name("Services").unwrap().kind, "Service");
        assert_eq!(by_cli_name("netpol").unwrap().kind, "NetworkPolicy");
        assert_eq!(
            by_cli_name("endpointslices.discovery.k8s.io").unwrap().kind,
            "EndpointSlice"
        );
        assert!(by_cli_name("deployments").is_none());
    }

    #[test]
    fn paths() {
        assert_eq!(
            SERVICE.object_path(Some("x"), "s"),
            "/api/v1/namespaces/x/services/s"
        );
        assert_eq!(
            ENDPOINT_SLICE.collection_path(None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
        assert_eq!(NODE.object_path(Some("ignored"), "n"), "/api/v1/nodes/n");
    }
}
