//! The install manifests (deploy/, a kustomize base) as `kubectl kustomize` renders them,
//! validated offline against a current Kubernetes release's schemas in strict mode
//! (kubernetes-validate, from PyPI), and custom objects against their CRD's schema.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `kubectl kustomize DIR`, validated strictly; the rendered text.
fn render_and_validate(dir: &std::path::Path) -> String {
    let rendered = ok(Command::new("kubectl").arg("kustomize").arg(dir));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("weir.yaml");
    std::fs::write(&f, &rendered).unwrap();
    // The same python3 the setup script installed it for (scripts directories vary).
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(&f));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    rendered
}

fn kinds_of(rendered: &str) -> Vec<String> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|d| {
            let v: serde_json::Value = serde::Deserialize::deserialize(d).unwrap();
            format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Renders `dir`, validates it strictly, and checks it holds every `kind/name` of `want` and
/// the image `make image` builds.
fn assert_renders(dir: &std::path::Path, want: &[&str]) {
    let rendered = render_and_validate(dir);
    let kinds = kinds_of(&rendered);
    for w in want {
        assert!(kinds.iter().any(|k| k == w), "{w} missing from {kinds:?}");
    }
    assert!(
        rendered.contains("image: localhost/weir:0.1.0"),
        "{rendered}"
    );
}

#[test]
fn manifests_render_and_validate_strictly() {
    assert_renders(
        &deploy_dir(),
        &[
            "Namespace/weir-system",
            "CustomResourceDefinition/securityidentities.weir.dev",
            "CustomResourceDefinition/remoteendpoints.weir.dev",
            "CustomResourceDefinition/remotenodes.weir.dev",
            "ServiceAccount/weir-agent",
            "ClusterRole/weir-agent",
            "ClusterRoleBinding/weir-agent",
            "CustomResourceDefinition/serviceexports.multicluster.x-k8s.io",
            "CustomResourceDefinition/serviceimports.multicluster.x-k8s.io",
            "CustomResourceDefinition/clusterproperties.about.k8s.io",
            "ConfigMap/weir-agent-config",
            "DaemonSet/weir-agent",
        ],
    );
}

/// The mesh (deploy/mesh/, applied after the base in each cluster of a clusterset).
#[test]
fn mesh_manifests_render_and_validate_strictly() {
    assert_renders(
        &deploy_dir().join("mesh"),
        &[
            "ServiceAccount/weir-mesh",
            "ClusterRole/weir-mesh",
            "ClusterRoleBinding/weir-mesh",
            "ConfigMap/weir-mesh-config",
            "Deployment/weir-mesh",
        ],
    );
}

/// Validates `object` against the CRD's openAPIV3Schema with python's jsonschema (a
/// dependency of kubernetes-validate); the validator's message on failure.
fn validate_against_crd(crd_file: &str, object: &serde_json::Value) -> Result<(), String> {
    let crd: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join(crd_file)).unwrap())
            .unwrap();
    let version = object["apiVersion"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let schema = &crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{crd_file} serves no {version}"))["schema"]["openAPIV3Schema"];
    let script = "import json,sys,jsonschema\nd=json.load(sys.stdin)\njsonschema.validate(d['object'], d['schema'])";
    let input = serde_json::json!({"object": object, "schema": schema}).to_string();
    let out = output_with_stdin(
        Command::new("python3").args(["-c", script]),
        input.as_bytes(),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[test]
fn security_identities_as_agents_write_them_fit_the_crd() {
    let good = serde_json::json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "SecurityIdentity",
        "metadata": {"name": "256"},
        "spec": {"namespace": "shop", "namespaceLabels": {"kubernetes.io/metadata.name": "shop"}, "podLabels": {"app": "web"}}
    });
    validate_against_crd("securityidentity-crd.yaml", &good).unwrap();
    let mut bad = good.clone();
    bad["spec"] = serde_json::json!({"podLabels": {"app": "web"}});
    let e = validate_against_crd("securityidentity-crd.yaml", &bad).unwrap_err();
    assert!(e.contains("'namespace' is a required property"), "{e}");
}

#[test]
fn multicluster_objects_fit_their_crds_in_both_versions() {
    for version in ["v1alpha1", "v1beta1"] {
        let mcs = format!("multicluster.x-k8s.io/{version}");
        let export = serde_json::json!({"apiVersion": mcs, "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Exported",
                "message": "", "lastTransitionTime": "2026-12-05T00:00:00Z"}]}});
        validate_against_crd("serviceexport-crd.yaml", &export).unwrap();
        let import = serde_json::json!({"apiVersion": mcs, "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.99.0.10"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            "status": {"clusters": [{"cluster": "c1"}, {"cluster": "c2"}]}});
        validate_against_crd("serviceimport-crd.yaml", &import).unwrap();
        let mut bad = import.clone();
        bad["spec"]["type"] = serde_json::json!("Other");
        let e = validate_against_crd("serviceimport-crd.yaml", &bad).unwrap_err();
        assert!(e.contains("'Other' is not one of"), "{e}");
        let about = format!("about.k8s.io/{version}");
        let prop = serde_json::json!({"apiVersion": about, "kind": "ClusterProperty",
            "metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": "c1"}});
        validate_against_crd("clusterproperty-crd.yaml", &prop).unwrap();
        let mut empty = prop.clone();
        empty["spec"]["value"] = serde_json::json!("");
        assert!(validate_against_crd("clusterproperty-crd.yaml", &empty).is_err());
    }
}

/// RemoteEndpoints and RemoteNodes as the mesh writes them fit their CRDs.
#[test]
fn global_traffic_policies_fit_their_crd() {
    let gtp = serde_json::json!({"apiVersion": "weir.dev/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "hello", "namespace": "mcs"},
        "spec": {"lbType": "FailOver",
            "priorities": [{"clusters": ["c1"]}, {"selector": {"sameAsImporter": ["region.weir.dev"]}}, {"selector": {}}],
            "overprovisioningFactor": 1.4, "panicThreshold": 50,
            "outlierDetection": {"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 100}}});
    validate_against_crd("globaltrafficpolicy-crd.yaml", &gtp).unwrap();
    // What weir's own validation refuses, the CRD's schema refuses too.
    for (field, bad) in [
        ("lbType", serde_json::json!("Random")),
        ("panicThreshold", serde_json::json!(101)),
        ("overprovisioningFactor", serde_json::json!(0.5)),
    ] {
        let mut o = gtp.clone();
        o["spec"][field] = bad;
        assert!(
            validate_against_crd("globaltrafficpolicy-crd.yaml", &o).is_err(),
            "{field}"
        );
        let kind = weir_model::kinds::GLOBAL_TRAFFIC_POLICY;
        assert!(
            weir_model::validate::validate(&kind, &o, None).is_err(),
            "{field}"
        );
    }
}

#[test]
fn mesh_mirrors_fit_their_crds() {
    let rep = serde_json::json!({"apiVersion": "weir.dev/v1alpha1", "kind": "RemoteEndpoint",
        "metadata": {"name": "c2.mcs.client"},
        "spec": {"cluster": "c2", "namespace": "mcs", "pod": "client", "ips": ["10.245.1.2", "fd00:10:245:1::2"],
                 "labels": {"app": "x"}, "namespaceLabels": {"kubernetes.io/metadata.name": "mcs"},
                 "ports": [{"name": "web", "protocol": "TCP", "port": 8080}]}});
    validate_against_crd("remoteendpoint-crd.yaml", &rep).unwrap();
    let mut bad = rep.clone();
    bad["spec"].as_object_mut().unwrap().remove("pod");
    assert!(validate_against_crd("remoteendpoint-crd.yaml", &bad).is_err());
    let node = serde_json::json!({"apiVersion": "weir.dev/v1alpha1", "kind": "RemoteNode",
        "metadata": {"name": "c2.node-1"},
        "spec": {"cluster": "c2", "node": "node-1", "addresses": ["172.30.2.11"],
                 "podCIDRs": ["10.245.1.0/24", "fd00:10:245:1::/64"]}});
    validate_against_crd("remotenode-crd.yaml", &node).unwrap();
}
