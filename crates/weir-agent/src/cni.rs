//! The agent's side of weir's CNI plugin: `GET /cni` tells the plugin its node's pod CIDRs
//! and addresses (from the agent's own Node object), `PUT /endpoints` takes an endpoint record
//! and answers once the pod's programs are attached (so ADD returns with the pod's datapath
//! in place), `DELETE /endpoints?id=` forgets one, `GET /endpoints` lists them. Records live
//! in the endpoint directory, which the agent also reads when it starts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use serde_json::{json, Value};
use weir_model::endpoint::EndpointRecord;

use crate::pods::{self, Pods};

/// `GET /cni`: the node's pod CIDRs (spec.podCIDRs, else spec.podCIDR) and its InternalIP
/// addresses, from the agent's view of its Node.
pub fn node_net(nodes: &Store<Node>, node_name: &str) -> Value {
    let node = nodes
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let spec = node
        .as_ref()
        .and_then(|n| n.spec.clone())
        .unwrap_or_default();
    let cidrs = spec
        .pod_cidrs
        .filter(|c| !c.is_empty())
        .or_else(|| spec.pod_cidr.map(|c| vec![c]))
        .unwrap_or_default();
    let addresses: Vec<String> = node
        .and_then(|n| n.status.clone())
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .collect();
    json!({"node": node_name, "podCIDRs": cidrs, "hostAddresses": addresses})
}

/// `PUT /endpoints`: writes the record and syncs the pod datapath at once; fails when the
/// record is invalid or its programs could not be attached (the record is then removed).
pub fn put(pods: &Arc<Pods>, body: &[u8]) -> Result<Value, (u16, String)> {
    let rec: EndpointRecord =
        serde_json::from_slice(body).map_err(|e| (400, format!("endpoint record: {e}")))?;
    rec.check()
        .map_err(|e| (400, format!("endpoint record {}: {e}", rec.uid)))?;
    let dir = pods.config.endpoint_dir.clone();
    rec.write(&dir)
        .map_err(|e| (500, format!("{}: {e}", dir.display())))?;
    // Judged on this record alone: another record left out is not this ADD's failure.
    let synced = pods::sync_now(pods).and_then(|stats| {
        match stats.failed.iter().find(|(uid, _)| *uid == rec.uid) {
            Some((_, why)) => Err(why.clone()),
            None => Ok(()),
        }
    });
    match synced {
        Ok(()) => Ok(json!({"attached": rec.uid})),
        Err(e) => {
            let _ = EndpointRecord::remove(&dir, &rec.uid);
            let _ = pods::sync_now(pods);
            Err((500, format!("attaching endpoint {}: {e}", rec.uid)))
        }
    }
}

/// `DELETE /endpoints?id=UID`: removes the record and syncs; succeeds when it was not there.
pub fn delete(pods: &Arc<Pods>, uid: &str) -> Result<Value, (u16, String)> {
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Err((400, format!("id: {uid:?} is not an endpoint record's id")));
    }
    let dir = pods.config.endpoint_dir.clone();
    let existed =
        EndpointRecord::remove(&dir, uid).map_err(|e| (500, format!("{}: {e}", dir.display())))?;
    pods::sync_now(pods).map_err(|e| (500, e))?;
    Ok(json!({"deleted": existed}))
}

/// `GET /endpoints`: every valid record.
pub fn list(pods: &Pods) -> Value {
    let (records, _) = EndpointRecord::read_dir(&pods.config.endpoint_dir);
    serde_json::to_value(records).expect("json")
}
