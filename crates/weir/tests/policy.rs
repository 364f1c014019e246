//! NetworkPolicy end to end, on the upstream Kubernetes network-policy e2e model: namespaces
//! x, y, z with pods a, b, c each (serving TCP and UDP on 80 and 81, one Service per pod),
//! spread over two nodes; every case checks the full 9x9 reachability matrix of
//! `weir lab probe`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PODS: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn model_yaml() -> String {
    let mut s = String::new();
    for ns in NAMESPACES {
        s.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
        ));
        for p in PODS {
            s.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {p}, namespace: {ns}, labels: {{pod: {p}}}}}\nspec:\n  containers:\n  - name: cont-80-81\n    image: agnhost\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n    - {{name: serve-81-tcp, containerPort: 81}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s-{p}, namespace: {ns}}}\nspec:\n  selector: {{pod: {p}}}\n  ports:\n  - {{name: t80, port: 80}}\n  - {{name: t81, port: 81}}\n  - {{name: u80, port: 80, protocol: UDP}}\n  - {{name: u81, port: 81, protocol: UDP}}\n---\n"
            ));
        }
    }
    s
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// The expected matrix: `allowed(from, to)`, and a pod always reaches itself.
fn expect(allowed: impl Fn(&str, &str) -> bool) -> BTreeMap<String, BTreeMap<String, bool>> {
    all_pods()
        .iter()
        .map(|f| {
            (
                f.clone(),
                all_pods()
                    .iter()
                    .map(|t| (t.clone(), f == t || allowed(f, t)))
                    .collect(),
            )
        })
        .collect()
}

fn rows(m: &Value) -> BTreeMap<String, BTreeMap<String, bool>> {
    serde_json::from_value(m["rows"].clone()).expect("matrix rows")
}

fn diff(
    got: &BTreeMap<String, BTreeMap<String, bool>>,
    want: &BTreeMap<String, BTreeMap<String, bool>>,
) -> String {
    let mut out = String::new();
    for (f, row) in want {
        for (t, w) in row {
            let g = got.get(f).and_then(|r| r.get(t)).copied();
            if g != Some(*w) {
                out.push_str(&format!("  {f} -> {t}: got {g:?}, want {w}\n"));
            }
        }
    }
    out
}

/// Probes until the matrix is the expected one (policy takes effect within moments; a probe
/// that times out takes its timeout), or fails with the differences.
fn assert_matrix(
    lab: &Lab,
    case: &str,
    port: u16,
    proto: &str,
    via: &str,
    want: &BTreeMap<String, BTreeMap<String, bool>>,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = rows(&lab.probe(port, proto, via));
        if &got == want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{case} ({proto}/{port} via {via}): matrix differs\n{}",
                diff(&got, want)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ns_of(p: &str) -> &str {
    p.split('/').next().unwrap()
}

/// `weir observe` names the policy that allowed a flow into an isolated pod, and the kind
/// of its entry: allow-a-80 admits other namespaces' pods (a peer) on one port.
fn observe_allowed(lab: &Lab) {
    let out = run(&mut lab.weir(&[
        "observe",
        "--verdict",
        "allowed",
        "--to-pod",
        "x/a",
        "--port",
        "80",
        "--last",
        "5000",
        "-o",
        "json",
    ]));
    let recs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let judged: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "policy-verdict" && r["protocol"] == "tcp")
        .collect();
    assert!(
        judged.iter().any(|r| r["source"]["namespace"] == "y"),
        "no allowed y -> x/a tcp/80: {recs:?}"
    );
    for r in judged {
        assert_eq!(r["policies"], serde_json::json!(["x/allow-a-80"]), "{r}");
        assert_eq!(r["policy_match"], "l3-l4", "{r}");
        assert_eq!(r["direction"], "ingress", "{r}");
    }
}

/// `weir observe`'s arguments for policy drops (kernel drops in the pods' namespaces, at
/// connections' ends, are dropped flows too), then `more`.
fn policy_drops(more: &[&'static str]) -> Vec<&'static str> {
    let mut a = vec![
        "observe",
        "--type",
        "policy-verdict",
        "--verdict",
        "dropped",
    ];
    a.extend_from_slice(more);
    a
}

/// `weir observe` shows the drops of default-deny-ingress in x: pods, port, direction and
/// reason, from both nodes; `--follow` prints new ones as they happen.
fn observe_drops(lab: &Lab) {
    let out = run(&mut lab.weir(&policy_drops(&[
        "--pod", "x/a", "--last", "5000", "-o", "json",
    ])));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &recs {
        assert_eq!(r["verdict"], "dropped", "{r}");
        assert_eq!(r["reason"], "DROP_POLICY_DENIED", "{r}");
        assert_eq!(r["direction"], "ingress", "{r}");
        assert!(
            r["destination"]["pod"] == "x/a" || r["source"]["pod"] == "x/a",
            "{r}"
        );
        assert!(
            r["destination"]["pod"]
                .as_str()
                .is_some_and(|p| p.starts_with("x/")),
            "{r}"
        );
        assert_eq!(r["source"]["identity_kind"], "pod", "{r}");
        // The policies that isolate x's pods decided it.
        let policies = r["policies"].as_array().unwrap();
        assert!(
            !policies.is_empty()
                && policies
                    .iter()
                    .all(|p| p.as_str().unwrap().starts_with("x/")),
            "{r}"
        );
    }
    let seen = |src: &str, port: u64, proto: &str| {
        recs.iter().any(|r| {
            r["source"]["pod"] == src
                && r["destination"]["pod"] == "x/a"
                && r["destination"]["port"] == port
                && r["protocol"] == proto
        })
    };
    assert!(
        seen("y/b", 80, "tcp"),
        "no drop of y/b -> x/a tcp/80: {recs:?}"
    );
    assert!(
        seen("z/c", 81, "udp"),
        "no drop of z/c -> x/a udp/81: {recs:?}"
    );
    // Both nodes judged some (the pods are spread over two nodes).
    let nodes: std::collections::BTreeSet<&str> =
        recs.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    let out = run(&mut lab.weir(&policy_drops(&["-n", "x", "--last", "1"])));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() == 1 && text.contains("DROPPED (DROP_POLICY_DENIED)"),
        "{text}"
    );

    // Following: a new drop shows up while the command runs.
    use std::io::BufRead;
    let mut child = lab
        .weir(&policy_drops(&["-f", "--pod", "x/b", "-o", "json"]))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            if tx.send(l.unwrap()).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let _ = lab.probe(80, "tcp", "pod-ip");
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let r: Value = serde_json::from_str(&line.expect("a followed drop")).unwrap();
    assert!(
        r["destination"]["pod"] == "x/b" || r["source"]["pod"] == "x/b",
        "{r}"
    );
    assert_eq!(r["verdict"], "dropped", "{r}");
}

#[test]
fn upstream_network_policy_model_on_two_nodes() {
    policy_model("ebpf");
}

#[test]
fn upstream_network_policy_model_on_two_nodes_nftables() {
    policy_model("nftables");
}

#[test]
fn upstream_network_policy_model_on_two_nodes_iptables() {
    policy_model("iptables");
}

/// The model on a dataplane: the same matrices; verdict events (`weir observe`) come from the
/// eBPF datapath only.
fn policy_model(dataplane: &str) {
    let lab = Lab::up_with(
        "pol",
        2,
        &model_yaml(),
        &["--identity-gc-grace", "2s", "--dataplane", dataplane],
    );
    let everything = expect(|_, _| true);
    assert_matrix(&lab, "no policy", 80, "tcp", "pod-ip", &everything);

    // should support a 'default-deny-ingress' policy
    let out = lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-ingress, namespace: x}\nspec: {podSelector: {}}\n",
    );
    assert!(out.status.success());
    let deny_x = expect(|_, t| ns_of(t) != "x");
    assert_matrix(&lab, "default-deny-ingress", 80, "tcp", "pod-ip", &deny_x);
    assert_matrix(&lab, "default-deny-ingress", 81, "udp", "pod-ip", &deny_x);
    // Policy applies after service translation.
    assert_matrix(&lab, "default-deny-ingress", 80, "tcp", "service", &deny_x);
    if dataplane == "ebpf" {
        observe_drops(&lab);
    }

    // should enforce policy based on NamespaceSelector with MatchExpressions, on a port:
    // x/a admits namespaces other than x on TCP 80 only (and nothing on 81).
    let out = lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-a-80, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]\n    ports: [{port: serve-80-tcp}]\n",
    );
    assert!(out.status.success());
    let ns_to_xa = expect(|f, t| ns_of(t) != "x" || (t == "x/a" && ns_of(f) != "x"));
    assert_matrix(
        &lab,
        "namespaceSelector + named port",
        80,
        "tcp",
        "pod-ip",
        &ns_to_xa,
    );
    assert_matrix(
        &lab,
        "namespaceSelector + named port",
        81,
        "tcp",
        "pod-ip",
        &deny_x,
    );
    assert_matrix(&lab, "named port is TCP's", 80, "udp", "pod-ip", &deny_x);
    if dataplane == "ebpf" {
        observe_allowed(&lab);
    }

    // Every policy has a status: selected pods, rules, and what is not enforced.
    let out = lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: unused, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: nope}}\n  ingress: [{ports: [{port: no-such-port}]}]\n",
    );
    assert!(out.status.success());
    let out = run(&mut lab.weir(&["get", "netpol", "-n", "x", "-o", "wide"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        text.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["POLICY-TYPES", "SELECTED", "RULES", "WARNINGS"]),
        "{text}"
    );
    assert!(
        row("deny-ingress").ends_with("Ingress x/a,x/b,x/c 0 <none>"),
        "{text}"
    );
    assert!(
        row("allow-a-80").ends_with("Ingress x/a 1 <none>"),
        "{text}"
    );
    assert!(row("unused").contains("selects no pods"), "{text}");
    assert!(
        row("unused").contains("named port \"no-such-port\" (TCP) is defined by no selected pod"),
        "{text}"
    );
    let out = run(&mut lab.kubectl(&["delete", "networkpolicy", "unused", "-n", "x"]));
    assert!(out.status.success());

    // should allow egress access to server in CIDR block / enforce except: y/a may only
    // reach z/b's address (a /32 inside a /16 with an except for everything else).
    let zb = lab.get_json(&["pod", "b", "-n", "z"]);
    let zb_ip = zb["status"]["podIP"].as_str().unwrap().to_string();
    let out = lab.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: egress-cidr, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {zb_ip}/32}}}}]\n"
    ));
    assert!(out.status.success());
    let with_egress = |f: &str, t: &str| {
        let ingress = ns_of(t) != "x" || (t == "x/a" && ns_of(f) != "x");
        let egress = f != "y/a" || t == "z/b";
        ingress && egress
    };
    assert_matrix(
        &lab,
        "egress ipBlock",
        80,
        "tcp",
        "pod-ip",
        &expect(with_egress),
    );
    assert_matrix(
        &lab,
        "egress ipBlock",
        81,
        "udp",
        "pod-ip",
        &expect(|f, t| ns_of(t) != "x" && (f != "y/a" || t == "z/b")),
    );

    // should support allow-all policy: an empty ingress rule admits everything again.
    let out = lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n",
    );
    assert!(out.status.success());
    assert_matrix(
        &lab,
        "allow-all (additive)",
        81,
        "tcp",
        "pod-ip",
        &expect(|f, t| f != "y/a" || t == "z/b"),
    );

    // Label changes take effect: y/a loses the label its policy selects it by.
    let out = run(&mut lab.kubectl(&["label", "pod", "a", "-n", "y", "pod=a2", "--overwrite"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_matrix(&lab, "relabelled pod", 81, "tcp", "pod-ip", &everything);

    // Identities were allocated cluster-wide, one per label set; y/a's old labels are no pod's
    // any more, and their identity is collected after the grace period (2 s here).
    let label_sets = || -> Vec<(String, String)> {
        let ids = lab.get_json(&["securityidentities"]);
        let mut sets: Vec<(String, String)> = ids["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                (
                    o["spec"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    o["spec"]["podLabels"]["pod"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        sets.sort();
        sets
    };
    let mut want: Vec<(String, String)> = ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b", "c"].map(|p| (ns.to_string(), p.to_string())))
        .collect();
    want[3].1 = "a2".into(); // y/a
    want.sort();
    lab.eventually(
        "one identity per pod label set, the unused one collected",
        Duration::from_secs(30),
        || label_sets() == want,
    );

    // Deleting the policies restores everything.
    for (ns, name) in [
        ("x", "deny-ingress"),
        ("x", "allow-a-80"),
        ("y", "egress-cidr"),
        ("x", "allow-all"),
    ] {
        let out = run(&mut lab.kubectl(&["delete", "networkpolicy", name, "-n", ns]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_matrix(&lab, "no policy again", 80, "udp", "pod-ip", &everything);
}

/// The same model over VXLAN: identities of pods on the other node are known from the
/// ipcache, whether the packet came through the tunnel or not.
#[test]
fn network_policy_between_nodes_over_vxlan() {
    let lab = Lab::up_with("polvx", 2, &model_yaml(), &["--tunnel", "vxlan"]);
    assert_matrix(
        &lab,
        "no policy (vxlan)",
        80,
        "tcp",
        "pod-ip",
        &expect(|_, _| true),
    );
    let out = lab.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-to-z, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expect(|f, t| {
        let ingress = ns_of(t) != "x" || ns_of(f) == "y";
        let egress = f != "y/b" || ns_of(t) == "z";
        ingress && egress
    });
    assert_matrix(
        &lab,
        "namespace selectors (vxlan)",
        80,
        "tcp",
        "pod-ip",
        &want,
    );
    assert_matrix(
        &lab,
        "namespace selectors (vxlan)",
        81,
        "udp",
        "pod-ip",
        &want,
    );
    assert_matrix(
        &lab,
        "namespace selectors (vxlan)",
        80,
        "tcp",
        "service",
        &want,
    );
}
