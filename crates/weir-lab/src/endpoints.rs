//! EndpointSlice computation with the semantics of Kubernetes' EndpointSlice controller:
//! one slice family per Service with a selector, one slice per address family and port
//! set, at most 100 endpoints per slice, ready/serving/terminating conditions, targetPorts
//! resolved by name per pod, and a placeholder slice when there are no endpoints.
//! Pure: no I/O, so it is unit-tested here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weir_model::LabelSelector;

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Label on the EndpointSlices of a Service without a cluster IP (proxies skip them).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Value of [`MANAGED_BY_LABEL`] for slices this controller owns (the upstream name, so
/// tools that look for it find it).
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
/// Most endpoints in one slice (the upstream default of --max-endpoints-per-slice).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What to write to make a Service's slices match its pods.
#[derive(Debug, Default)]
pub struct SlicePlan {
    /// Slices to create (with `generateName`).
    pub create: Vec<EndpointSlice>,
    /// Existing slices to replace (with their resourceVersion).
    pub update: Vec<EndpointSlice>,
    /// Names of slices to delete.
    pub delete: Vec<String>,
}

impl SlicePlan {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

type PortKey = Vec<(String, i32, String)>;

/// Desired endpoints grouped by (address type, port set): the ports, and endpoints by pod uid.
type Groups = BTreeMap<(String, PortKey), (Vec<EndpointPort>, BTreeMap<String, Endpoint>)>;

/// A slice being planned: the existing slice it updates (if any), its address type, ports
/// and endpoints.
type Planned<'a> = (
    Option<&'a EndpointSlice>,
    String,
    Vec<EndpointPort>,
    Vec<Endpoint>,
);

fn port_key(ports: &[EndpointPort]) -> PortKey {
    let mut k: PortKey = ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or(0),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect();
    k.sort();
    k
}

/// Whether the pod's Ready condition is True.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The port a Service port targets on `pod`: a number as is, a name looked up among the
/// pod's containerPorts with the same protocol. None when the name is not found.
pub fn resolve_target_port(pod: &Pod, sp: &ServicePort) -> Option<i32> {
    let proto = sp.protocol.as_deref().unwrap_or("TCP");
    match sp.target_port.as_ref() {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
            c.ports.as_ref()?.iter().find_map(|p| {
                (p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == proto)
                    .then_some(p.container_port)
            })
        }),
    }
}

fn family_of(ip: &str) -> &'static str {
    if ip.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The labels of a Service's EndpointSlices, as the upstream controller sets them
/// (staging/src/k8s.io/endpointslice/utils.go, setEndpointSliceLabels): the Service's own
/// labels but the two the controller owns, `service.kubernetes.io/headless` exactly when the
/// Service has no cluster IP, the Service's name and the controller's.
fn slice_labels(svc: &Service) -> BTreeMap<String, String> {
    let mut l = svc.metadata.labels.clone().unwrap_or_default();
    l.remove(SERVICE_NAME_LABEL);
    l.remove(MANAGED_BY_LABEL);
    let cluster_ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    if matches!(cluster_ip, None | Some("") | Some("None")) {
        l.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        l.remove(HEADLESS_LABEL);
    }
    l.insert(
        SERVICE_NAME_LABEL.into(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    l.insert(MANAGED_BY_LABEL.into(), CONTROLLER_NAME.into());
    l
}

fn new_slice(
    svc: &Service,
    address_type: &str,
    ports: Vec<EndpointPort>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let name = svc.metadata.name.clone().unwrap_or_default();
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(slice_labels(svc)),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name,
                uid: svc.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        address_type: address_type.into(),
        endpoints: Some(endpoints),
        ports: if ports.is_empty() { None } else { Some(ports) },
    }
}

/// The desired endpoints of `svc`, keyed by (address type, port set) then by pod uid.
fn desired(svc: &Service, pods: &[Pod]) -> Groups {
    let mut out = Groups::new();
    let spec = svc.spec.clone().unwrap_or_default();
    let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return out;
    };
    let selector = LabelSelector::from_map(sel);
    let families = spec
        .ip_families
        .clone()
        .unwrap_or_else(|| vec!["IPv4".into()]);
    let publish = spec.publish_not_ready_addresses.unwrap_or(false);
    let svc_ns = svc.metadata.namespace.clone().unwrap_or_default();
    for pod in pods {
        if pod.metadata.namespace.as_deref() != Some(svc_ns.as_str()) {
            continue;
        }
        if !selector.matches(&pod.metadata.labels.clone().unwrap_or_default()) {
            continue;
        }
        let status = pod.status.clone().unwrap_or_default();
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let ips: Vec<String> = status
            .pod_ips
            .as_ref()
            .map(|v| v.iter().map(|i| i.ip.clone()).collect())
            .or_else(|| status.pod_ip.clone().map(|i| vec![i]))
            .unwrap_or_default();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let serving = publish || pod_is_ready(pod);
        let ready = publish || (serving && !terminating);
        let mut ports: Vec<EndpointPort> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                Some(EndpointPort {
                    name: Some(sp.name.clone().unwrap_or_default()),
                    port: Some(resolve_target_port(pod, sp)?),
                    protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    app_protocol: sp.app_protocol.clone(),
                })
            })
            .collect();
        ports.sort_by_key(|p| (p.name.clone(), p.port, p.protocol.clone()));
        let key = port_key(&ports);
        for fam in &families {
            let Some(ip) = ips.iter().find(|i| family_of(i) == fam) else {
                continue;
            };
            let ep = Endpoint {
                addresses: vec![ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                hostname: endpoint_hostname(pod, svc),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: pod.metadata.namespace.clone(),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let uid = pod
                .metadata
                .uid
                .clone()
                .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
            out.entry((fam.clone(), key.clone()))
                .or_insert_with(|| (ports.clone(), BTreeMap::new()))
                .1
                .insert(uid, ep);
        }
    }
    out
}

fn endpoint_uid(e: &Endpoint) -> Option<String> {
    e.target_ref
        .as_ref()
        .and_then(|r| r.uid.clone().or_else(|| r.name.clone()))
}

/// Plans the writes that make `existing` (the slices this controller manages for `svc`)
/// match `pods` (the pods of the Service's namespace). Endpoints stay in the slice they are
/// in while they remain, so that a change touches as few slices as possible.
pub fn plan(svc: &Service, pods: &[Pod], existing: &[EndpointSlice]) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let has_selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty());
    if !has_selector {
        plan.delete = existing
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        return plan;
    }
    let mut want = desired(svc, pods);
    let labels = slice_labels(svc);
    let mut existing: Vec<&EndpointSlice> = existing.iter().collect();
    existing.sort_by_key(|s| s.metadata.name.clone());

    if want.is_empty() {
        // A placeholder: one empty slice of the primary family, so watchers see the Service
        // has no endpoints rather than no slices.
        let fam = svc
            .spec
            .as_ref()
            .and_then(|s| s.ip_families.as_ref())
            .and_then(|f| f.first().cloned())
            .unwrap_or_else(|| "IPv4".into());
        let mut kept = false;
        for s in existing {
            let is_placeholder = s.endpoints.as_ref().is_none_or(|e| e.is_empty())
                && s.ports.as_ref().is_none_or(|p| p.is_empty())
                && s.address_type == fam;
            if is_placeholder && !kept {
                kept = true;
                if s.metadata.labels.as_ref() != Some(&labels) {
                    let mut u = s.clone();
                    u.metadata.labels = Some(labels.clone());
                    plan.update.push(u);
                }
            } else if let Some(n) = &s.metadata.name {
                plan.delete.push(n.clone());
            }
        }
        if !kept {
            plan.create
                .push(new_slice(svc, &fam, Vec::new(), Vec::new()));
        }
        return plan;
    }

    // Keep endpoints where they are.
    let mut result: Vec<Planned> = Vec::new();
    for s in existing {
        let key = (
            s.address_type.clone(),
            port_key(s.ports.as_deref().unwrap_or(&[])),
        );
        match want.get_mut(&key) {
            None => plan
                .delete
                .push(s.metadata.name.clone().unwrap_or_default()),
            Some((ports, eps)) => {
                let kept: Vec<Endpoint> = s
                    .endpoints
                    .iter()
                    .flatten()
                    .filter_map(|e| endpoint_uid(e).and_then(|u| eps.remove(&u)))
                    .collect();
                result.push((Some(s), key.0, ports.clone(), kept));
            }
        }
    }
    // Fill new endpoints into slices with room, then into new slices.
    for ((fam, _key), (ports, eps)) in want {
        let mut rest: Vec<Endpoint> = eps.into_values().collect();
        for r in result
            .iter_mut()
            .filter(|r| r.1 == fam && port_key(&r.2) == port_key(&ports))
        {
            while r.3.len() < MAX_ENDPOINTS_PER_SLICE && !rest.is_empty() {
                r.3.push(rest.remove(0));
            }
        }
        for chunk in rest.chunks(MAX_ENDPOINTS_PER_SLICE) {
            result.push((None, fam.clone(), ports.clone(), chunk.to_vec()));
        }
    }
    for (old, fam, ports, mut eps) in result {
        eps.sort_by_key(|e| e.target_ref.as_ref().and_then(|r| r.name.clone()));
        match old {
            Some(s) if eps.is_empty() => plan
                .delete
                .push(s.metadata.name.clone().unwrap_or_default()),
            Some(s) => {
                let ports_opt = if ports.is_empty() { None } else { Some(ports) };
                if s.endpoints.clone().unwrap_or_default() != eps
                    || s.ports != ports_opt
                    || s.metadata.labels.as_ref() != Some(&labels)
                {
                    let mut u = s.clone();
                    u.endpoints = Some(eps);
                    u.ports = ports_opt;
                    u.metadata.labels = Some(labels.clone());
                    plan.update.push(u);
                }
            }
            None => plan.create.push(new_slice(svc, &fam, ports, eps)),
        }
    }
    plan
}

/// Names of Services (in `ns`) whose selector matches `labels`, for deciding which
/// Services a pod change touches.
pub fn services_selecting<'a>(
    services: impl Iterator<Item = &'a Service>,
    labels: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    services
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|sp| sp.selector.as_ref())
                .is_some_and(|sel| !sel.is_empty() && LabelSelector::from_map(sel).matches(labels))
        })
        .filter_map(|s| s.metadata.name.clone())
        .collect()
}

/// An endpoint's hostname, as the upstream EndpointSlice controller sets it: the pod's
/// `spec.hostname` when its `spec.subdomain` names the Service (in the pod's namespace).
fn endpoint_hostname(pod: &Pod, svc: &Service) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let subdomain = spec.subdomain.as_deref()?;
    (Some(subdomain) == svc.metadata.name.as_deref()
        && pod.metadata.namespace == svc.metadata.namespace)
        .then(|| spec.hostname.clone())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ports: serde_json::Value, families: &[&str]) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "x", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": ports, "ipFamilies": families}}),
        )
        .unwrap()
    }

    fn pod(name: &str, ready: bool, terminating: bool, port_name: &str, port: i32) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "x", "uid": format!("uid-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i", "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": format!("10.244.1.{}", name.len() + port as usize % 7),
                       "podIPs": [{"ip": format!("10.244.1.{}", name.len() + port as usize % 7)}, {"ip": format!("fd00::{}", name.len())}],
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        })).unwrap();
        if terminating {
            p.metadata.deletion_timestamp =
                Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
        }
        p
    }

    #[test]
    fn conditions_follow_readiness_and_termination() {
        let s = svc(
            json!([{"port": 80, "targetPort": 8080, "protocol": "TCP"}]),
            &["IPv4"],
        );
        let pods = vec![
            pod("a", true, false, "http", 8080),
            pod("bb", false, false, "http", 8080),
            pod("ccc", true, true, "http", 8080),
        ];
        let p = plan(&s, &pods, &[]);
        assert_eq!(p.create.len(), 1);
        let slice = &p.create[0];
        let endpoints = slice.endpoints.clone().unwrap();
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(
            slice.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        let c: Vec<(bool, bool, bool)> = endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
            })
            .collect();
        assert_eq!(
            c,
            vec![
                (true, true, false),
                (false, false, false),
                (false, true, true)
            ]
        );
        assert_eq!(
            endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("a")
        );
        assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(8080));
    }

    #[test]
    fn named_ports_split_slices_and_dual_stack() {
        let s = svc(
            json!([{"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"}]),
            &["IPv4", "IPv6"],
        );
        let pods = vec![
            pod("a", true, false, "http", 8080),
            pod("b", true, false, "http", 9090),
            pod("c", true, false, "other", 1),
        ];
        let p = plan(&s, &pods, &[]);
        // Two port sets (8080, 9090) x two families; pod c has no port named http and lands
        // in a slice with no ports.
        assert_eq!(p.create.len(), 6, "{:#?}", p.create);
        assert!(p.create.iter().any(|s| s.address_type == "IPv6"));
    }

    #[test]
    fn stable_updates_placeholder_and_chunking() {
        let s = svc(json!([{"port": 80, "protocol": "TCP"}]), &["IPv4"]);
        let mut pods: Vec<Pod> = (0..150)
            .map(|i| pod(&format!("p{i:03}"), true, false, "http", 80))
            .collect();
        for (i, p) in pods.iter_mut().enumerate() {
            p.status.as_mut().unwrap().pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP {
                ip: format!("10.244.{}.{}", i / 200, i % 200 + 2),
            }]);
        }
        let p = plan(&s, &pods, &[]);
        assert_eq!(
            p.create
                .iter()
                .map(|s| s.endpoints.as_ref().unwrap().len())
                .collect::<Vec<_>>(),
            vec![100, 50]
        );
        let mut existing = p.create.clone();
        for (i, e) in existing.iter_mut().enumerate() {
            e.metadata.name = Some(format!("web-{i}"));
        }
        assert!(plan(&s, &pods, &existing).is_empty());
        // One pod goes: only its slice changes.
        pods.remove(3);
        let p2 = plan(&s, &pods, &existing);
        assert_eq!(
            (p2.create.len(), p2.update.len(), p2.delete.len()),
            (0, 1, 0)
        );
        // All go: a placeholder remains.
        let p3 = plan(&s, &[], &existing);
        assert_eq!((p3.create.len(), p3.delete.len()), (1, 2));
        assert!(p3.create[0].endpoints.as_ref().unwrap().is_empty());
    }

    #[test]
    fn services_without_selector_are_left_alone() {
        let mut s = svc(json!([{"port": 80}]), &["IPv4"]);
        s.spec.as_mut().unwrap().selector = None;
        let p = plan(&s, &[pod("a", true, false, "http", 80)], &[]);
        assert!(p.is_empty());
    }

    #[test]
    fn slice_labels_copy_the_service_and_mark_headless_as_upstream() {
        let mut s = svc(json!([{"port": 80}]), &["IPv4"]);
        s.metadata.labels = Some(
            [
                ("team", "a"),
                (SERVICE_NAME_LABEL, "spoofed"),
                (HEADLESS_LABEL, ""),
                ("service.kubernetes.io/service-proxy-name", "weir"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        s.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.10".into());
        let l = slice_labels(&s);
        assert_eq!(l["team"], "a");
        assert_eq!(l["service.kubernetes.io/service-proxy-name"], "weir");
        assert_eq!(l[SERVICE_NAME_LABEL], "web");
        assert_eq!(l[MANAGED_BY_LABEL], CONTROLLER_NAME);
        // The headless label follows the cluster IP, not the Service's own labels.
        assert!(!l.contains_key(HEADLESS_LABEL));
        s.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert_eq!(slice_labels(&s)[HEADLESS_LABEL], "");
    }
}
