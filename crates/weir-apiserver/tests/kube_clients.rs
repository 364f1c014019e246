//! The API server against a real client: kube-rs over TLS with a bearer token.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use weir_apiserver::pki::Pki;
use weir_apiserver::{Listen, Running, ServerConfig, StoreConfig, TlsFiles};

async fn start(dir: &Path, port: u16, history: usize) -> Running {
    let pki = Pki::ensure(&dir.join("pki"), "test").unwrap();
    let cfg = ServerConfig {
        data_dir: dir.join("data"),
        listen: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], port))),
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
        token: Some(pki.read_token().unwrap()),
        store: StoreConfig {
            history,
            ..Default::default()
        },
        bookmark_interval: Duration::from_millis(300),
        runtime_config: Default::default(),
    };
    // A restarted server may find the previous one still closing its database.
    for _ in 0..100 {
        match weir_apiserver::start(cfg.clone()).await {
            Ok(r) => return r,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("server did not start");
}

async fn client(dir: &Path, port: u16) -> Client {
    let pki = Pki::in_dir(&dir.join("pki"));
    let kc = dir.join("kubeconfig");
    pki.write_kubeconfig(&kc, "test", &format!("https://127.0.0.1:{port}"))
        .unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kc).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    Client::try_from(cfg).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "t"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}})).unwrap()
}

#[tokio::test]
async fn crud_conflicts_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, 1000).await;
    let c = client(dir.path(), port).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    match pods.create(&PostParams::default(), &pod("a")).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("{other:?}"),
    }
    // Concurrent writers from the same version: exactly one wins, the rest get 409 Conflict.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (pods, mut p) = (pods.clone(), created.clone());
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("writer".into(), i.to_string());
        tasks.push(tokio::spawn(async move {
            pods.replace("a", &PostParams::default(), &p).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1);
    // Merge patch and label selectors.
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "x"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        pods.list(&ListParams::default().labels("tier=x"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        pods.list(&ListParams::default().labels("tier!=x"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );
    assert_eq!(
        pods.list(&ListParams::default().fields("metadata.name=a"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // Validation names object and field; nothing is written.
    let svcs: Api<Service> = Api::namespaced(c.clone(), "default");
    let bad: Service = serde_json::from_value(
        json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}, {"port": 80}]}}),
    )
    .unwrap();
    match svcs.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert!(
                s.message.contains("Service \"s\" is invalid"),
                "{}",
                s.message
            );
            assert!(
                s.message.contains("spec.ports[0].name: Required value"),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(svcs.get_opt("s").await.unwrap().is_none());
    // ClusterIP allocation, explicit IPs honoured and rejected when taken.
    let s1: Service = serde_json::from_value(json!({"metadata": {"name": "s1"}, "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.5.5"}})).unwrap();
    assert_eq!(
        svcs.create(&PostParams::default(), &s1)
            .await
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("10.96.5.5")
    );
    let s2: Service = serde_json::from_value(json!({"metadata": {"name": "s2"}, "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.5.5"}})).unwrap();
    match svcs.create(&PostParams::default(), &s2).await {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("already allocated"), "{}", s.message)
        }
        other => panic!("{other:?}"),
    }
    // Server-side apply creates, then merges.
    let ssa = PatchParams::apply("test").force();
    let applied = svcs.patch("s3", &ssa, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s3"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}))).await.unwrap();
    let np = applied.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&np));
    // Unauthenticated requests are refused.
    let anon = reqwest_like_status(port).await;
    assert_eq!(anon, 401);
    // Graceful pod deletion: marked, then removed when confirmed.
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"nodeName": "n1"}})),
    )
    .await
    .unwrap();
    pods.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(pods
        .get("a")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    pods.delete(
        "a",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(pods.get_opt("a").await.unwrap().is_none());
    server.shutdown().await;
}

/// Status of an unauthenticated TLS request, made with kube's own client stack but no token.
async fn reqwest_like_status(port: u16) -> u16 {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kc");
    std::fs::write(&kc, format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kc).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let c = Client::try_from(cfg).unwrap();
    match Api::<Pod>::namespaced(c, "default")
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("expected 401, got {other:?}"),
    }
}

/// Runs a kube-rs reflector and returns its store and a counter of relists.
fn reflect(
    c: Client,
) -> (
    reflector::Store<Pod>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let (reader, writer) = reflector::store();
    let relists = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r2 = relists.clone();
    let api: Api<Pod> = Api::namespaced(c, "default");
    let cfg = watcher::Config::default().timeout(2);
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(stream);
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Init) = ev {
                r2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (reader, relists)
}

async fn names_eventually(store: &reflector::Store<Pod>, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    for _ in 0..200 {
        let mut have: Vec<String> = store
            .state()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        have.sort();
        if have == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let have: Vec<String> = store
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    panic!("reflector has {have:?}, want {want:?}");
}

#[tokio::test]
async fn reflector_resumes_across_restart_without_relisting() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, 1000).await;
    let c = client(dir.path(), port).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    for n in ["p1", "p2", "p3"] {
        pods.create(&PostParams::default(), &pod(n)).await.unwrap();
    }
    let (store, relists) = reflect(c.clone());
    store.wait_until_ready().await.unwrap();
    names_eventually(&store, &["p1", "p2", "p3"]).await;
    let relists_before = relists.load(std::sync::atomic::Ordering::SeqCst);
    server.shutdown().await;
    let server = start(dir.path(), port, 1000).await;
    pods.create(&PostParams::default(), &pod("p4"))
        .await
        .unwrap();
    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    names_eventually(&store, &["p2", "p3", "p4"]).await;
    // The watch resumed from its resourceVersion: the history survived the restart.
    assert_eq!(
        relists.load(std::sync::atomic::Ordering::SeqCst),
        relists_before
    );
    server.shutdown().await;
}

#[tokio::test]
async fn reflector_relists_after_410() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, 5).await;
    let c = client(dir.path(), port).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    pods.create(&PostParams::default(), &pod("p0"))
        .await
        .unwrap();
    let (store, relists) = reflect(c.clone());
    store.wait_until_ready().await.unwrap();
    names_eventually(&store, &["p0"]).await;
    server.shutdown().await;
    let server = start(dir.path(), port, 5).await;
    // More writes than the history holds, before the watcher comes back: its version is
    // compacted away, it gets 410 Expired and must relist.
    let names: Vec<String> = (1..=10).map(|i| format!("q{i:02}")).collect();
    for n in &names {
        let p = serde_json::to_value(pod(n)).unwrap();
        server
            .store
            .create(
                &weir_model::kinds::POD,
                Some("default"),
                p,
                Default::default(),
            )
            .unwrap();
    }
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.insert(0, "p0");
    names_eventually(&store, &want).await;
    assert!(
        relists.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the watcher should have relisted after 410"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, 1000).await;
    let c = client(dir.path(), port).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    for n in ["s1", "s2"] {
        pods.create(&PostParams::default(), &pod(n)).await.unwrap();
    }
    // With streaming lists there is no LIST: the store fills only when the server sends the
    // initial-events-end bookmark after the synthetic ADDED events.
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(pods.clone(), watcher::Config::default().streaming_lists()),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(stream);
        while s.next().await.is_some() {}
    });
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("store ready")
        .unwrap();
    names_eventually(&reader, &["s1", "s2"]).await;
    // A label selector watch sees an object leave the selection as DELETED.
    let (sel_reader, sel_writer) = reflector::store();
    let sel = reflector::reflector(
        sel_writer,
        watcher::watcher(pods.clone(), watcher::Config::default().labels("tier=a")),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(sel);
        while s.next().await.is_some() {}
    });
    sel_reader.wait_until_ready().await.unwrap();
    pods.patch(
        "s1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "a"}}})),
    )
    .await
    .unwrap();
    names_eventually(&sel_reader, &["s1"]).await;
    pods.patch(
        "s1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "b"}}})),
    )
    .await
    .unwrap();
    names_eventually(&sel_reader, &[]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: Listen::Unix(sock.clone()),
        tls: None,
        token: None,
        store: StoreConfig::default(),
        bookmark_interval: Duration::from_secs(5),
        runtime_config: Default::default(),
    };
    let server = weir_apiserver::start(cfg).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    s.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("\"kubernetes.io/metadata.name\":\"kube-system\""),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    server.shutdown().await;
}
