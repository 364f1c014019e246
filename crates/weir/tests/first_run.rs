//! First-run states, tried on purpose: labs brought up in a private mount namespace where
//! /sys/fs/bpf and /run/netns start unmounted, as on a machine that never ran a lab. The BPF
//! filesystem must be mounted exactly once (a second mount would hide the first agent's
//! pins, and that node would stop translating north-south traffic), and NodePorts must answer
//! on every node.

mod common;

use common::*;

fn manifest() -> String {
    let pod = |name: &str, node: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: np}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{containerPort: 8080}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: x}}\nspec:\n  type: NodePort\n  selector: {{app: np}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n",
        pod("a", "node-1"),
        pod("b", "node-2")
    )
}

#[test]
fn first_lab_on_a_fresh_machine_mounts_bpffs_once_and_serves_node_ports_on_every_node() {
    // The race showed in about one first run in five: eight first runs, each in a fresh
    // mount namespace.
    for run in 0..8 {
        let ns = MountNs::fresh();
        assert!(ns.mounts_at("/sys/fs/bpf").is_empty());
        assert!(ns.mounts_at("/run/netns").is_empty());
        let lab = Lab::up_in(Some(ns), "fr", 2, &manifest(), &[]);
        let ns = lab.mntns.as_ref().unwrap();
        assert_eq!(
            ns.mounts_at("/sys/fs/bpf"),
            vec!["bpf".to_string()],
            "run {run}: one BPF filesystem at /sys/fs/bpf"
        );
        assert_eq!(
            ns.mounts_at("/run/netns").len(),
            1,
            "run {run}: one mount at /run/netns"
        );
        let port = lab.get_json(&["svc", "np", "-n", "x"])["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .unwrap();
        for node in ["node-1", "node-2"] {
            let to = format!("{}:{port}", lab.node_ip(node));
            let r = lab.connect("external", &to, "tcp", 20);
            assert_eq!(r["ok"], 20, "run {run}: NodePort on {node}: {r}");
        }
    }
}
