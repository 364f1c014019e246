//! weir-cni driven as a container runtime drives it, on a lab node: the CNI_* environment,
//! the network configuration on stdin (built from the node's conflist as libcni builds it),
//! the result parsed from stdout, from inside the node's network namespace.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SERVER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: c}\nspec:\n  containers:\n  - {name: s, image: echo, ports: [{containerPort: 8080}]}\n";

/// A runtime's view of one lab node: where the plugin and its configuration are.
struct Runtime {
    lab: String,
    node_netns: PathBuf,
    bin_dir: PathBuf,
    /// The conflist's plugin object, with the list's name.
    plugin: Value,
    name: String,
}

/// What one plugin execution returned.
struct Outcome {
    ok: bool,
    out: Value,
}

impl Runtime {
    fn of(lab: &Lab) -> Runtime {
        let nodes: Value =
            serde_json::from_str(&ok(&mut lab.weir(&["lab", "nodes", "-o", "json"]))).unwrap();
        let n = &nodes[0];
        let conf_dir = PathBuf::from(n["cniConfDir"].as_str().unwrap());
        let bin_dir = PathBuf::from(n["cniBinDir"].as_str().unwrap());
        assert!(conf_dir.is_absolute() && bin_dir.is_absolute());
        // The lexicographically first configuration, as runtimes choose it.
        let mut files: Vec<_> = std::fs::read_dir(&conf_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
        assert_eq!(list["cniVersion"], "1.1.0");
        assert_eq!(
            list["plugins"].as_array().unwrap().len(),
            1,
            "weir alone: {list}"
        );
        Runtime {
            lab: lab.name.clone(),
            node_netns: PathBuf::from(format!("/run/netns/{}", n["netns"].as_str().unwrap())),
            bin_dir,
            plugin: list["plugins"][0].clone(),
            name: list["name"].as_str().unwrap().to_string(),
        }
    }

    /// A network namespace for a "container" (named under the lab, so `lab down` removes
    /// what a failed test leaves).
    fn sandbox(&self, id: &str) -> PathBuf {
        let name = format!("weir.{}.cni-{id}", self.lab);
        ok(Command::new("ip").args(["netns", "add", &name]));
        PathBuf::from(format!("/run/netns/{name}"))
    }

    /// The request configuration for `plugin` in `version`, as libcni derives it.
    fn conf(&self, plugin: &Value, version: &str, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["cniVersion"] = json!(version);
        c["name"] = json!(self.name);
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// Executes `binary` with `env` and `conf` on stdin, in the node's network namespace.
    fn exec(&self, binary: &Path, env: &[(&str, &str)], conf: &Value) -> Outcome {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_netns.display()))
            .arg("--")
            .arg(binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni", self.bin_dir.display()),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = output_with_stdin(&mut cmd, conf.to_string().as_bytes());
        let text = String::from_utf8_lossy(&o.stdout);
        Outcome {
            ok: o.status.success(),
            out: serde_json::from_str(text.trim()).unwrap_or(Value::Null),
        }
    }

    fn weir(&self, cmd: &str, id: &str, netns: &Path, conf: &Value) -> Outcome {
        self.exec(
            &self.bin_dir.join("weir-cni"),
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns.to_str().unwrap()),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    &format!(
                        "IgnoreUnknown=1;K8S_POD_NAMESPACE=c;K8S_POD_NAME={id};K8S_POD_UID={id}"
                    ),
                ),
            ],
            conf,
        )
    }
}

fn endpoint_ips(lab: &Lab) -> Vec<String> {
    let v: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "endpoint", "list", "-o", "json"])
    ))
    .unwrap();
    v.as_array()
        .or_else(|| v["endpoints"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|e| e["ip"].as_str().map(String::from))
        .collect()
}

/// Reads `namespace/name` from the echo server at `to` from inside `netns`.
fn ask(netns: &Path, to: &str) -> String {
    let (host, port) = to.rsplit_once(':').unwrap();
    let script = format!("exec 3<>/dev/tcp/{host}/{port}; head -c 64 <&3");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["timeout", "5", "bash", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn weir_cni_as_a_runtime_drives_it() {
    let lab = Lab::up("cni", 1, SERVER);
    let rt = Runtime::of(&lab);
    let server_ip = lab.get_json(&["pod", "server", "-n", "c"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();

    // VERSION.
    let v = rt.exec(
        &rt.bin_dir.join("weir-cni"),
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.1.0"}),
    );
    assert!(v.ok);
    assert_eq!(
        v.out["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    // A record whose device is gone (a pod's namespace removed without a DEL) is left out,
    // and keeps no other pod from its datapath.
    let endpoint_dir = PathBuf::from(rt.plugin["endpointDir"].as_str().unwrap());
    std::fs::write(
        endpoint_dir.join("stale:eth0.json"),
        json!({"pod": "c/stale", "uid": "stale:eth0", "ips": ["10.244.1.250"], "hostIf": "lxcgone",
            "hostIfindex": 999999, "hostMac": "02:00:00:00:00:01", "mac": "02:00:00:00:00:02"})
        .to_string(),
    )
    .unwrap();

    // ADD: the result, the agent's endpoint (attached before ADD returned), traffic.
    let conf = rt.conf(&rt.plugin, "1.1.0", None);
    let ns1 = rt.sandbox("a1");
    let started = Instant::now();
    let add = rt.weir("ADD", "a1", &ns1, &conf);
    let add_time = started.elapsed();
    assert!(add.ok, "ADD: {}", add.out);
    let r = &add.out;
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], ns1.to_str().unwrap());
    assert_eq!(r["interfaces"][0].get("sandbox"), None, "host side: {r}");
    let ips: Vec<String> = r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ips[0].starts_with("10.244.1.") && ips[0].ends_with("/32"),
        "{r}"
    );
    assert!(
        ips[1].starts_with("fd00:10:244:1::") && ips[1].ends_with("/128"),
        "{r}"
    );
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
    );
    let ip1 = ips[0].trim_end_matches("/32").to_string();
    assert_ne!(
        ip1, server_ip,
        "the kubelet's pods and the plugin share one allocator"
    );
    assert!(
        endpoint_ips(&lab).contains(&ip1),
        "the agent has the endpoint when ADD returns"
    );
    assert_eq!(ask(&ns1, &format!("{server_ip}:8080")), "c/server");
    eprintln!("ADD took {add_time:?}");

    // CHECK with the ADD result; an ADD of an interface that exists fails.
    assert!(
        rt.weir("CHECK", "a1", &ns1, &rt.conf(&rt.plugin, "1.1.0", Some(r)))
            .ok
    );
    let again = rt.weir("ADD", "a1b", &ns1, &conf);
    assert!(
        !again.ok && again.out["code"].as_u64().unwrap() >= 100,
        "{}",
        again.out
    );

    // Errors: bad configuration, unknown version, missing network namespace, exhausted pool.
    let bad = rt.exec(
        &rt.bin_dir.join("weir-cni"),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ],
        &json!("nope"),
    );
    assert_eq!(bad.out["code"], 6, "{}", bad.out);
    let old = rt.weir("ADD", "x", &ns1, &rt.conf(&rt.plugin, "0.9.9", None));
    assert_eq!(old.out["code"], 1, "{}", old.out);
    assert!(old.out["msg"].as_str().unwrap().contains("1.1.0"));
    let missing = rt.weir(
        "ADD",
        "x",
        Path::new("/run/netns/weir-no-such-netns"),
        &conf,
    );
    assert_eq!(missing.out["code"], 3, "{}", missing.out);
    let ipam_dir = PathBuf::from(rt.plugin["ipamDataDir"].as_str().unwrap());
    let mut filler = Vec::new();
    for i in 2..255 {
        let f = ipam_dir.join(format!("10.244.1.{i}"));
        if !f.exists() {
            std::fs::write(&f, "filler\neth0").unwrap();
            filler.push(f);
        }
    }
    let ns_full = rt.sandbox("full");
    let full = rt.weir("ADD", "full", &ns_full, &conf);
    assert_eq!(full.out["code"], 100, "{}", full.out);
    assert!(
        full.out["msg"].as_str().unwrap().contains("10.244.1.0/24"),
        "{}",
        full.out
    );
    for f in filler {
        std::fs::remove_file(f).unwrap();
    }
    // The failed ADD left nothing: its DEL (which a runtime always sends) succeeds.
    assert!(rt.weir("DEL", "full", &ns_full, &conf).ok);

    // Chaining: weir then Debian's `tuning` in a 1.0.0 list; DEL in reverse order.
    let ns2 = rt.sandbox("a2");
    let conf10 = rt.conf(&rt.plugin, "1.0.0", None);
    let add2 = rt.weir("ADD", "a2", &ns2, &conf10);
    assert!(add2.ok && add2.out["cniVersion"] == "1.0.0", "{}", add2.out);
    let tuning = rt.conf(
        &json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}}),
        "1.0.0",
        Some(&add2.out),
    );
    let env2: Vec<(&str, &str)> = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "a2"),
        ("CNI_NETNS", ns2.to_str().unwrap()),
        ("CNI_IFNAME", "eth0"),
    ];
    let t = rt.exec(Path::new("/usr/lib/cni/tuning"), &env2, &tuning);
    assert!(t.ok, "tuning after weir: {}", t.out);
    assert_eq!(
        t.out["ips"], add2.out["ips"],
        "tuning passes weir's result on"
    );
    let somaxconn = ok(Command::new("nsenter")
        .arg(format!("--net={}", ns2.display()))
        .args(["cat", "/proc/sys/net/core/somaxconn"]));
    assert_eq!(somaxconn.trim(), "777");
    let mut del_env = env2.clone();
    del_env[0] = ("CNI_COMMAND", "DEL");
    assert!(
        rt.exec(
            Path::new("/usr/lib/cni/tuning"),
            &del_env,
            &rt.conf(&tuning, "1.0.0", Some(&t.out))
        )
        .ok
    );
    assert!(
        rt.weir(
            "DEL",
            "a2",
            &ns2,
            &rt.conf(&rt.plugin, "1.0.0", Some(&t.out))
        )
        .ok
    );
    // An older runtime's 0.4.0 result names each address's version.
    let ns3 = rt.sandbox("a3");
    let add3 = rt.weir("ADD", "a3", &ns3, &rt.conf(&rt.plugin, "0.4.0", None));
    assert_eq!(add3.out["ips"][0]["version"], "4", "{}", add3.out);
    assert!(rt.weir("DEL", "a3", &ns3, &conf).ok);

    // DEL: endpoint, address and interface gone; again, and for a container never added.
    let del = rt.weir("DEL", "a1", &ns1, &rt.conf(&rt.plugin, "1.1.0", Some(r)));
    assert!(del.ok, "{}", del.out);
    assert!(!endpoint_ips(&lab).contains(&ip1));
    assert!(rt.weir("DEL", "a1", &ns1, &conf).ok);
    assert!(rt.weir("DEL", "never", Path::new(""), &conf).ok);
    // The released address is handed out again at once.
    let add4 = rt.weir("ADD", "a4", &ns1, &conf);
    assert_eq!(
        add4.out["ips"][0]["address"],
        format!("{ip1}/32"),
        "{}",
        add4.out
    );

    // STATUS; and DEL while the agent is away: the record goes from the endpoint directory,
    // which the agent reads, and the agent drops the endpoint.
    assert!(rt.weir("STATUS", "", Path::new(""), &conf).ok);
    let mut away = rt.plugin.clone();
    away["agentSocket"] = json!("/run/weir-no-agent.sock");
    let away = rt.conf(&away, "1.1.0", None);
    let st = rt.weir("STATUS", "", Path::new(""), &away);
    assert_eq!(st.out["code"], 50, "{}", st.out);
    assert!(rt.weir("DEL", "a4", &ns1, &away).ok);
    lab.eventually(
        "the agent drops a4's endpoint",
        Duration::from_secs(10),
        || !endpoint_ips(&lab).contains(&ip1),
    );

    // GC without the list of valid attachments is refused (it would remove every pod).
    let g = rt.exec(
        &rt.bin_dir.join("weir-cni"),
        &[("CNI_COMMAND", "GC")],
        &conf,
    );
    assert_eq!(g.out["code"], 7, "{}", g.out);
    std::fs::remove_file(endpoint_dir.join("stale:eth0.json")).unwrap();

    // GC: only the attachments named valid keep their addresses.
    let ns5 = rt.sandbox("a5");
    let ns6 = rt.sandbox("a6");
    assert!(rt.weir("ADD", "a5", &ns5, &conf).ok);
    let add6 = rt.weir("ADD", "a6", &ns6, &conf);
    let mut gc = conf.clone();
    // The kubelet wires its pods through the same plugin (container ID: the pod's uid), so a
    // runtime's GC on this node names those attachments too.
    let server_uid = lab.get_json(&["pod", "server", "-n", "c"])["metadata"]["uid"].clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a5", "ifname": "eth0"}, {"containerID": server_uid, "ifname": "eth0"}]);
    let g = rt.exec(&rt.bin_dir.join("weir-cni"), &[("CNI_COMMAND", "GC")], &gc);
    assert!(g.ok, "{}", g.out);
    let ip6 = add6.out["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    assert!(!endpoint_ips(&lab).contains(&ip6));
    assert!(!ipam_dir.join(&ip6).exists());
    assert_eq!(ask(&ns5, &format!("{server_ip}:8080")), "c/server");
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses() {
    let lab = Lab::up("cnic", 1, "");
    let rt = std::sync::Arc::new(Runtime::of(&lab));
    let conf = rt.conf(&rt.plugin, "1.1.0", None);
    let started = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let rt = rt.clone();
            let conf = conf.clone();
            std::thread::spawn(move || {
                let id = format!("c{i}");
                let ns = rt.sandbox(&id);
                let t = Instant::now();
                let o = rt.weir("ADD", &id, &ns, &conf);
                (o, t.elapsed())
            })
        })
        .collect();
    let mut ips = std::collections::BTreeSet::new();
    let mut times = Vec::new();
    for h in handles {
        let (o, t) = h.join().unwrap();
        assert!(o.ok, "{}", o.out);
        assert!(ips.insert(o.out["ips"][0]["address"].as_str().unwrap().to_string()));
        times.push(t);
    }
    times.sort();
    eprintln!(
        "50 concurrent ADDs in {:?}; per ADD median {:?}, max {:?}",
        started.elapsed(),
        times[25],
        times[49]
    );
    assert_eq!(ips.len(), 50);
    assert_eq!(endpoint_ips(&lab).len(), 100, "both families of all 50");
    for i in 0..50 {
        let id = format!("c{i}");
        let ns = PathBuf::from(format!("/run/netns/weir.{}.cni-{id}", rt.lab));
        assert!(rt.weir("DEL", &id, &ns, &conf).ok);
    }
    assert!(endpoint_ips(&lab).is_empty());
}
