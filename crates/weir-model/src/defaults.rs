//! Defaults the API server fills in, as kube-apiserver's defaulting functions do
//! (`SetDefaults_*` of pkg/apis/core/v1, discovery/v1 and networking/v1 defaults.go, run on
//! every write: create, update, patch, apply and status), so that every reader (controllers,
//! agents, `weir get`) sees explicit values. What the registry strategies add on create or
//! update (status on create, fields dropped on a type change) is in [`crate::strategy`].

use serde_json::{json, Map, Value};

use crate::kinds::ResourceKind;

/// The object at `key` of object `v`, made an empty object when absent or not an object.
fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    obj_mut_in(v.as_object_mut().expect("object"), key)
}

/// Whether `v` is what Go decodes as a zero value: absent, null, "" or 0.
fn is_unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

/// Sets `key` to `v` when it is unset (absent, null, "" or 0, as Go's zero values).
fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if is_unset(m.get(key)) {
        m.insert(key.to_string(), v);
    }
}

/// Sets `key` to `v` when it is absent or null (Go pointer fields, where 0 and "" are values).
fn set_if_absent(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

/// The objects of the array at `key` of `m`, for defaulting each.
fn each_mut<'a>(
    m: &'a mut Map<String, Value>,
    key: &str,
) -> impl Iterator<Item = &'a mut Map<String, Value>> {
    m.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
}

/// Fills in defaults for an object of `kind` (not allocation: that needs cluster state).
pub fn apply_defaults(kind: &ResourceKind, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    match kind.kind {
        "Namespace" => namespace(obj),
        "Pod" => pod(obj),
        "Service" => service(obj),
        "Node" => node(obj),
        "EndpointSlice" => {
            // SetDefaults_EndpointPort.
            for p in each_mut(obj.as_object_mut().expect("object"), "ports") {
                set_if_absent(p, "name", json!(""));
                set_if_absent(p, "protocol", json!("TCP"));
            }
        }
        "NetworkPolicy" => network_policy(obj),
        _ => {}
    }
}

/// SetDefaults_Namespace and SetDefaults_NamespaceStatus.
fn namespace(obj: &mut Value) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !name.is_empty() {
        let meta = obj_mut(obj, "metadata");
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        if let Some(l) = labels.as_object_mut() {
            l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
        }
    }
    set_default(obj_mut(obj, "status"), "phase", json!("Active"));
}

/// SetDefaults_Pod, SetDefaults_PodSpec and the defaults of what a Pod holds (containers,
/// probes, volumes), as SetObjectDefaults_Pod runs them.
fn pod(obj: &mut Value) {
    let spec = obj_mut(obj, "spec");
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "restartPolicy", json!("Always"));
    set_if_absent(spec, "securityContext", json!({}));
    set_if_absent(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_if_absent(spec, "enableServiceLinks", json!(true));
    let host_network = spec.get("hostNetwork") == Some(&json!(true));
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in each_mut(spec, list) {
            container(c, host_network && list != "ephemeralContainers");
        }
    }
    for v in each_mut(spec, "volumes") {
        volume(v);
    }
}

/// The image's tag as ParseImageName gives it: "latest" when it names neither tag nor digest,
/// "" when it names only a digest.
fn image_tag(image: &str) -> &str {
    let (name, digest) = match image.split_once('@') {
        Some((n, _)) => (n, true),
        None => (image, false),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, tag)) => tag,
        None if digest => "",
        None => "latest",
    }
}

/// SetDefaults_Container (and what a container holds), for containers, init containers and
/// ephemeral containers alike; with host networking a port's hostPort is its containerPort
/// (SetDefaults_Pod).
fn container(c: &mut Map<String, Value>, host_network: bool) {
    if is_unset(c.get("imagePullPolicy")) {
        let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
        let policy = if image_tag(image) == "latest" {
            "Always"
        } else {
            "IfNotPresent"
        };
        c.insert("imagePullPolicy".into(), json!(policy));
    }
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    for p in each_mut(c, "ports") {
        set_default(p, "protocol", json!("TCP"));
        if host_network && is_unset(p.get("hostPort")) {
            if let Some(port) = p.get("containerPort").cloned() {
                p.insert("hostPort".into(), port);
            }
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            http_get(p);
        }
    }
    if let Some(l) = c.get_mut("lifecycle").and_then(Value::as_object_mut) {
        for hook in ["postStart", "preStop"] {
            if let Some(h) = l.get_mut(hook).and_then(Value::as_object_mut) {
                http_get(h);
            }
        }
    }
    for e in each_mut(c, "env") {
        if let Some(f) = e
            .get_mut("valueFrom")
            .and_then(|v| v.get_mut("fieldRef"))
            .and_then(Value::as_object_mut)
        {
            set_default(f, "apiVersion", json!("v1"));
        }
    }
    // SetDefaults_Pod: a limit without a request is also the request.
    if let Some(r) = c.get_mut("resources").and_then(Value::as_object_mut) {
        if let Some(limits) = r.get("limits").and_then(Value::as_object).cloned() {
            let requests = obj_mut_in(r, "requests");
            for (k, v) in limits {
                requests.entry(k).or_insert(v);
            }
        }
    }
}

/// The object at `key` of `m`, made an empty object when absent or not an object.
fn obj_mut_in<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let e = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if !e.is_object() {
        *e = json!({});
    }
    e.as_object_mut().expect("object")
}

/// SetDefaults_HTTPGetAction: path "/", scheme "HTTP".
fn http_get(handler: &mut Map<String, Value>) {
    if let Some(h) = handler.get_mut("httpGet").and_then(Value::as_object_mut) {
        set_default(h, "path", json!("/"));
        set_default(h, "scheme", json!("HTTP"));
    }
}

/// SetDefaults_Volume and the default modes of the projected sources (0644 = 420).
fn volume(v: &mut Map<String, Value>) {
    const SOURCES: &[&str] = &[
        "hostPath",
        "emptyDir",
        "gcePersistentDisk",
        "awsElasticBlockStore",
        "gitRepo",
        "secret",
        "nfs",
        "iscsi",
        "glusterfs",
        "persistentVolumeClaim",
        "rbd",
        "flexVolume",
        "cinder",
        "cephfs",
        "flocker",
        "downwardAPI",
        "fc",
        "azureFile",
        "configMap",
        "vsphereVolume",
        "quobyte",
        "azureDisk",
        "photonPersistentDisk",
        "projected",
        "portworxVolume",
        "scaleIO",
        "storageos",
        "csi",
        "ephemeral",
        "image",
    ];
    if !SOURCES
        .iter()
        .any(|s| v.get(*s).is_some_and(|x| !x.is_null()))
    {
        v.insert("emptyDir".into(), json!({}));
    }
    for source in ["secret", "configMap", "downwardAPI", "projected"] {
        if let Some(s) = v.get_mut(source).and_then(Value::as_object_mut) {
            set_if_absent(s, "defaultMode", json!(420));
        }
    }
    if let Some(h) = v.get_mut("hostPath").and_then(Value::as_object_mut) {
        set_if_absent(h, "type", json!(""));
    }
}

/// ExternallyAccessible of pkg/api/v1/service: NodePort and LoadBalancer Services, and
/// ClusterIP ones with external IPs.
pub fn externally_accessible(spec: &Value) -> bool {
    let ty = spec.get("type").and_then(Value::as_str).unwrap_or_default();
    let has_external_ips = spec
        .get("externalIPs")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    ty == "LoadBalancer" || ty == "NodePort" || (ty == "ClusterIP" && has_external_ips)
}

/// SetDefaults_Service (and SetDefaults_LoadBalancerIngress for its status).
fn service(obj: &mut Value) {
    let spec = obj_mut(obj, "spec");
    set_default(spec, "sessionAffinity", json!("None"));
    if spec["sessionAffinity"] == "None" {
        // Affinity off: its configuration goes, so switching ClientIP -> None is accepted.
        spec.remove("sessionAffinityConfig");
    } else if spec["sessionAffinity"] == "ClientIP"
        && spec
            .get("sessionAffinityConfig")
            .and_then(|c| c.pointer("/clientIP/timeoutSeconds"))
            .is_none_or(Value::is_null)
    {
        spec.insert(
            "sessionAffinityConfig".into(),
            json!({"clientIP": {"timeoutSeconds": 10800}}),
        );
    }
    set_default(spec, "type", json!("ClusterIP"));
    for p in each_mut(spec, "ports") {
        set_default(p, "protocol", json!("TCP"));
        if is_unset(p.get("targetPort")) {
            if let Some(port) = p.get("port").cloned() {
                p.insert("targetPort".into(), port);
            }
        }
    }
    let ty = spec["type"].as_str().unwrap_or_default().to_string();
    if externally_accessible(&Value::Object(spec.clone())) {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if matches!(ty.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer") {
        set_if_absent(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if ty == "LoadBalancer" {
        set_if_absent(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if ty == "LoadBalancer" {
        let ingress = obj
            .pointer_mut("/status/loadBalancer/ingress")
            .and_then(Value::as_array_mut);
        for i in ingress
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            if i.get("ip")
                .and_then(Value::as_str)
                .is_some_and(|ip| !ip.is_empty())
            {
                set_if_absent(i, "ipMode", json!("VIP"));
            }
        }
    }
}

/// SetDefaults_NodeStatus: allocatable is the capacity when not given.
fn node(obj: &mut Value) {
    let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(c) = status.get("capacity").filter(|c| c.is_object()).cloned() {
        set_if_absent(status, "allocatable", c);
    }
}

/// SetDefaults_NetworkPolicy and SetDefaults_NetworkPolicyPort.
fn network_policy(obj: &mut Value) {
    let spec = obj_mut(obj, "spec");
    let no_types = spec
        .get("policyTypes")
        .is_none_or(|t| t.as_array().is_none_or(Vec::is_empty));
    if no_types {
        let mut types = vec![json!("Ingress")];
        // Egress only for a non-empty list: `egress: []` isolates nothing.
        if spec
            .get("egress")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
        {
            types.push(json!("Egress"));
        }
        spec.insert("policyTypes".into(), Value::Array(types));
    }
    for dir in ["ingress", "egress"] {
        for rule in each_mut(spec, dir) {
            for p in each_mut(rule, "ports") {
                set_default(p, "protocol", json!("TCP"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::*;

    #[test]
    fn service_defaults() {
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"sessionAffinity": "ClientIP", "ports": [{"port": 80}, {"port": 53, "targetPort": 0}]}});
        apply_defaults(&SERVICE, &mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["ports"][1]["targetPort"], 53);
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["internalTrafficPolicy"], "Cluster");
        assert!(s["spec"].get("externalTrafficPolicy").is_none());
        assert_eq!(
            s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        // Affinity back to None (as kubectl apply sends it): the configuration goes with it.
        s["spec"]["sessionAffinity"] = json!("None");
        apply_defaults(&SERVICE, &mut s);
        assert!(s["spec"].get("sessionAffinityConfig").is_none(), "{s}");
        // A ClusterIP Service with external IPs is externally accessible.
        let mut s = json!({"spec": {"externalIPs": ["192.0.2.1"], "ports": [{"port": 80}]}});
        apply_defaults(&SERVICE, &mut s);
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Cluster");
        let mut lb = json!({"spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {"ingress": [{"ip": "172.30.100.1"}, {"hostname": "x"}]}}});
        apply_defaults(&SERVICE, &mut lb);
        assert_eq!(lb["spec"]["allocateLoadBalancerNodePorts"], true);
        assert_eq!(lb["status"]["loadBalancer"]["ingress"][0]["ipMode"], "VIP");
        assert!(lb["status"]["loadBalancer"]["ingress"][1]
            .get("ipMode")
            .is_none());
    }

    #[test]
    fn namespace_label_and_policy_types() {
        let mut n =
            json!({"metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "y"}}});
        apply_defaults(&NAMESPACE, &mut n);
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        assert_eq!(n["status"]["phase"], "Active");
        let mut p = json!({"spec": {"podSelector": {}, "egress": [{}]}});
        apply_defaults(&NETWORK_POLICY, &mut p);
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        // An empty egress list and an empty policyTypes list: Ingress only.
        let mut p = json!({"spec": {"podSelector": {}, "egress": [], "policyTypes": []}});
        apply_defaults(&NETWORK_POLICY, &mut p);
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
    }

    #[test]
    fn pod_and_container_defaults() {
        let mut p = json!({"spec": {"hostNetwork": true,
            "initContainers": [{"name": "i", "image": "busybox:1.36", "ports": [{"containerPort": 1}]}],
            "containers": [{"name": "c", "image": "registry.local:5000/echo",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"port": 8080}},
                "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}},
                {"name": "d", "image": "x@sha256:abc"}],
            "volumes": [{"name": "v"}, {"name": "s", "secret": {"secretName": "s"}}]}});
        apply_defaults(&POD, &mut p);
        let s = &p["spec"];
        assert_eq!(s["securityContext"], json!({}));
        assert_eq!(s["enableServiceLinks"], true);
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        let c = &s["containers"][0];
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(c["terminationMessagePolicy"], "File");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(c["ports"][0]["hostPort"], 8080);
        assert_eq!(
            c["readinessProbe"],
            json!({"httpGet": {"port": 8080, "path": "/", "scheme": "HTTP"}, "timeoutSeconds": 1,
                "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3})
        );
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"], "v1");
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "500m", "memory": "1Gi"})
        );
        assert_eq!(s["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(s["initContainers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(s["initContainers"][0]["ports"][0]["hostPort"], 1);
        assert_eq!(s["volumes"][0]["emptyDir"], json!({}));
        assert_eq!(s["volumes"][1]["secret"]["defaultMode"], 420);
    }

    #[test]
    fn image_tags_as_parse_image_name() {
        assert_eq!(image_tag("nginx"), "latest");
        assert_eq!(image_tag("nginx:latest"), "latest");
        assert_eq!(image_tag("nginx:1.27"), "1.27");
        assert_eq!(image_tag("host:5000/team/app"), "latest");
        assert_eq!(image_tag("host:5000/team/app:v2"), "v2");
        assert_eq!(image_tag("app@sha256:00"), "");
        assert_eq!(image_tag("app:v1@sha256:00"), "v1");
    }

    #[test]
    fn endpoint_slice_and_node_defaults() {
        let mut sl = json!({"addressType": "IPv4", "ports": [{"port": 80}]});
        apply_defaults(&ENDPOINT_SLICE, &mut sl);
        assert_eq!(
            sl["ports"][0],
            json!({"port": 80, "name": "", "protocol": "TCP"})
        );
        let mut n = json!({"status": {"capacity": {"cpu": "2", "pods": "110"}}});
        apply_defaults(&NODE, &mut n);
        assert_eq!(n["status"]["allocatable"], n["status"]["capacity"]);
    }
}
