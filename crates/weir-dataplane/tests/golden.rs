//! Golden tests: one fixture set of Services and EndpointSlices (tests/fixtures/services.yaml)
//! rendered by each dataplane, compared with the rendering checked in under tests/golden/.
//! `WEIR_BLESS=1 cargo test -p weir-dataplane --test golden` rewrites them after a deliberate
//! change (review the diff).

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_json::Value;
use weir_control::lb::{self, LbState};
use weir_dataplane::ipt;
use weir_dataplane::nft::expr::Family;
use weir_dataplane::nft::{render, NodeNet};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// The fixtures' desired state on node-1.
fn fixture_state() -> LbState {
    let text = std::fs::read_to_string(dir().join("fixtures/services.yaml")).unwrap();
    let (mut services, mut slices) = (Vec::<Service>::new(), Vec::<EndpointSlice>::new());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Service") => services.push(serde_json::from_value(v).unwrap()),
            Some("EndpointSlice") => slices.push(serde_json::from_value(v).unwrap()),
            other => panic!("unexpected kind {other:?} in the fixtures"),
        }
    }
    let opts = lb::Options {
        node_name: "node-1".into(),
        default_algorithm: lb::Algorithm::Random,
        default_mode: lb::LbMode::Snat,
    };
    let (state, warnings) = lb::build(&services, &slices, &opts);
    assert!(warnings.is_empty(), "{warnings:?}");
    state
}

/// Compares `got` with the golden file `name` (or rewrites it when blessing).
fn golden(name: &str, got: &str) {
    let path = dir().join("golden").join(name);
    if std::env::var_os("WEIR_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEIR_BLESS=1 writes it)", path.display()));
    if want != got {
        let line = want
            .lines()
            .zip(got.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(got.lines().count()));
        panic!(
            "{} differs from the rendering from line {} (WEIR_BLESS=1 rewrites it):\n  golden: {:?}\n  now:    {:?}",
            path.display(),
            line + 1,
            want.lines().nth(line),
            got.lines().nth(line)
        );
    }
}

fn node() -> NodeNet {
    NodeNet {
        devices: vec!["eth0".into()],
        snat_ports: (45056, 65535),
        masquerade: Some(vec![
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        ]),
    }
}

/// Runs `cmd ARGS` with `input` on stdin; panics with its stderr when it fails.
fn check(cmd: &str, args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The iptables rendering of the fixtures (IPv4 then IPv6, nat then filter), as a first
/// apply restores it; checked by iptables-restore --test.
#[test]
fn iptables_rendering_matches_the_golden_file() {
    let state = fixture_state();
    let mut text = String::new();
    for (f, bin) in [
        (Family::Ip, "iptables-restore"),
        (Family::Ip6, "ip6tables-restore"),
    ] {
        let (nat, filter) =
            ipt::render::tables(f, &node(), &ipt::render::frontends(&state, f), &[]);
        text.push_str(&format!("# {}\n{nat}{filter}", f.name()));
        check(bin, &["--test", "--noflush"], &format!("{nat}{filter}"));
    }
    golden("iptables.txt", &text);
}

/// The nftables rendering of the fixtures: the whole-table transaction of a first apply.
#[test]
fn nftables_rendering_matches_the_golden_file() {
    let state = fixture_state();
    let node = node();
    let mut cmds = Vec::new();
    for f in [Family::Ip, Family::Ip6] {
        cmds.extend(render::skeleton(f, &node));
    }
    for fe in render::frontends(&state).values() {
        cmds.extend(render::add_frontend(fe));
    }
    let text = cmds
        .iter()
        .map(|c| serde_json::to_string(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    golden("nftables.jsonl", &text);
    // The kernel accepts it (nft's check mode: evaluated, not committed).
    let doc = serde_json::json!({ "nftables": cmds }).to_string();
    check("nft", &["-c", "-j", "-f", "-"], &doc);
}
