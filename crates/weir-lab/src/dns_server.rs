//! The lab's DNS server process (`weir lab dns`): one per cluster, answering on
//! [`dns::NODE_LOCAL_DNS`]:53 (UDP and TCP) inside every node's network namespace (as
//! NodeLocal DNSCache does), from a watch of the cluster's Services, ServiceImports,
//! EndpointSlices and Namespaces.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::Message;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::dns::{self, View};
use crate::paths::{self, LabPaths, Layout};
use crate::{client, sys, LabError};

/// Binds the DNS sockets inside network namespace `netns` (sockets keep the namespace they
/// were made in, so the server runs in the host's and serves every node's).
fn bind_in(
    netns: &std::path::Path,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), LabError> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<_, LabError> {
        sys::enter_netns(&netns)?;
        let addr: SocketAddr = format!("{}:53", dns::NODE_LOCAL_DNS).parse().expect("addr");
        let udp = std::net::UdpSocket::bind(addr).map_err(|e| LabError::io(netns.clone(), e))?;
        let tcp = std::net::TcpListener::bind(addr).map_err(|e| LabError::io(netns.clone(), e))?;
        udp.set_nonblocking(true)
            .map_err(|e| LabError::io(netns.clone(), e))?;
        tcp.set_nonblocking(true)
            .map_err(|e| LabError::io(netns.clone(), e))?;
        Ok((udp, tcp))
    })
    .join()
    .map_err(|_| LabError::Command("binding the DNS server".into(), "thread panicked".into()))?
}

/// The answer to `query`, within `limit` bytes: the additional records go first, then the
/// answers with TC set (the client retries over TCP), as CoreDNS truncates.
fn reply(view: &RwLock<View>, query: &[u8], limit: Option<usize>) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = dns::respond(&view.read().expect("view"), &req);
    if let Some(e) = &req.edns {
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(e.max_payload().max(512));
        resp.edns = Some(edns);
    }
    let limit = limit.map(|l| {
        req.edns
            .as_ref()
            .map_or(512, |e| e.max_payload().max(512) as usize)
            .min(l)
    });
    let bytes = resp.to_vec().ok()?;
    let Some(limit) = limit.filter(|l| bytes.len() > *l) else {
        return Some(bytes);
    };
    resp.additionals.clear();
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    resp.truncate().to_vec().ok()
}

async fn serve_udp(sock: tokio::net::UdpSocket, view: Arc<RwLock<View>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(out) = reply(&view, &buf[..n], Some(4096)) {
            let _ = sock.send_to(&out, from).await;
        }
    }
}

async fn serve_tcp(l: tokio::net::TcpListener, view: Arc<RwLock<View>>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            loop {
                let Ok(len) = s.read_u16().await else { return };
                let mut q = vec![0u8; len as usize];
                if s.read_exact(&mut q).await.is_err() {
                    return;
                }
                let Some(out) = reply(&view, &q, Some(u16::MAX as usize)) else {
                    return;
                };
                if s.write_u16(out.len() as u16).await.is_err() || s.write_all(&out).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// The view of the stores as they are now.
fn build_view(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    namespaces: &Store<Namespace>,
    imports: &Store<DynamicObject>,
) -> View {
    let (s, sl, ns, im) = (
        services.state(),
        slices.state(),
        namespaces.state(),
        imports.state(),
    );
    let svc_refs: Vec<&Service> = s.iter().map(|a| a.as_ref()).collect();
    let slice_refs: Vec<&EndpointSlice> = sl.iter().map(|a| a.as_ref()).collect();
    let imp_refs: Vec<(&kube::api::ObjectMeta, &serde_json::Value)> =
        im.iter().map(|o| (&o.metadata, &o.data)).collect();
    let names = ns.iter().filter_map(|n| n.metadata.name.clone());
    let serial = jiff::Timestamp::now().as_second() as u32;
    View::build(names, &svc_refs, &imp_refs, &slice_refs, serial)
}

fn waker<K>(n: &Arc<Notify>) -> impl Fn(Option<&watcher::Event<K>>) + Send + 'static {
    let n = n.clone();
    move |_| n.notify_one()
}

/// Runs the DNS server of lab (or clusterset cluster) `name` until the process is stopped.
pub async fn run(name: &str) -> Result<(), LabError> {
    let p = LabPaths::new(name);
    let layout = Layout::load(&p)?;
    let c = client::client_from_kubeconfig(&p.kubeconfig()).await?;
    let changed = Arc::new(Notify::new());
    let all = watcher::Config::default;
    let services =
        weir_agent::spawn_reflector(Api::<Service>::all(c.clone()), all(), waker(&changed));
    let slices =
        weir_agent::spawn_reflector(Api::<EndpointSlice>::all(c.clone()), all(), waker(&changed));
    let namespaces =
        weir_agent::spawn_reflector(Api::<Namespace>::all(c.clone()), all(), waker(&changed));
    let imports = weir_agent::spawn_kind_reflector(
        &c,
        &weir_model::kinds::SERVICE_IMPORT,
        all(),
        waker(&changed),
    );
    // Nothing is answered before every list is in: an empty view would deny names that exist
    // (CoreDNS answers SERVFAIL until it has synced; here the port is not open yet).
    for ready in [
        services.wait_until_ready().await.is_ok(),
        slices.wait_until_ready().await.is_ok(),
        namespaces.wait_until_ready().await.is_ok(),
        imports.wait_until_ready().await.is_ok(),
    ] {
        if !ready {
            return Err(LabError::Kube("a watch ended before it started".into()));
        }
    }
    let view = Arc::new(RwLock::new(build_view(
        &services,
        &slices,
        &namespaces,
        &imports,
    )));
    for n in &layout.nodes {
        let (udp, tcp) = bind_in(&paths::netns_path(&n.netns))?;
        let udp =
            tokio::net::UdpSocket::from_std(udp).map_err(|e| LabError::io(p.dir.clone(), e))?;
        let tcp =
            tokio::net::TcpListener::from_std(tcp).map_err(|e| LabError::io(p.dir.clone(), e))?;
        tokio::spawn(serve_udp(udp, view.clone()));
        tokio::spawn(serve_tcp(tcp, view.clone()));
    }
    tracing::info!(
        nodes = layout.nodes.len(),
        "DNS answering on {}:53 in every node",
        dns::NODE_LOCAL_DNS
    );
    loop {
        changed.notified().await;
        let started = std::time::Instant::now();
        let next = build_view(&services, &slices, &namespaces, &imports);
        *view.write().expect("view") = next;
        // Coalesce bursts: rest four times as long as the build took, so that a stream of
        // changes (thousands of imports arriving) costs at most a fifth of a core, and an
        // answer lags the API by at most a few builds.
        let rest = (started.elapsed() * 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        tokio::time::sleep(rest).await;
    }
}
