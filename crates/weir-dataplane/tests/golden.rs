//! Golden tests: one fixture set of Services and EndpointSlices (tests/fixtures/services.yaml)
//! rendered by each dataplane (the eBPF dataplane's map contents, the nftables transaction,
//! the iptables-restore text), compared with the rendering checked in under tests/golden/.
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

/// Pins of the test's own, removed on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = weir_bpf::SockLb::remove_pins(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn v4(a: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(a.to_ne_bytes())
}

fn v6(a: [u32; 4]) -> std::net::Ipv6Addr {
    weir_bpf::ip6_from_words(a)
}

fn proto(n: u8) -> &'static str {
    match n {
        6 => "tcp",
        17 => "udp",
        _ => "?",
    }
}

fn scope(n: u8) -> &'static str {
    if n == 1 {
        "external"
    } else {
        "cluster"
    }
}

fn service(v: &weir_bpf::types::lb_service, slot: u16) -> String {
    if slot == 0 {
        format!(
            "count {} svc {} flags {:#x} affinity {}s maglev {}",
            v.count, v.svc_id, v.flags, v.affinity_timeout, v.backend_id
        )
    } else {
        format!("backend {}", v.backend_id)
    }
}

/// A services-map entry: the frontend at `at`, its protocol, scope and slot, and the value.
fn svc_line(at: &str, (p, sc, slot): (u8, u8, u16), v: &weir_bpf::types::lb_service) -> String {
    format!(
        "{at}/{} {} slot {slot} => {}",
        proto(p),
        scope(sc),
        service(v, slot)
    )
}

/// The load-balancing maps' contents, one sorted line per entry, addresses in words.
fn map_contents(lb: &weir_bpf::SockLb) -> String {
    use weir_bpf::types::*;
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    let e4: Vec<(lb4_key, lb_service)> = lb.entries("weir_lb4_svc").unwrap();
    sections.push((
        "weir_lb4_svc",
        e4.iter()
            .map(|(k, v)| {
                let at = format!("{}:{}", v4(k.address), u16::from_be(k.dport));
                svc_line(&at, (k.proto, k.scope, k.slot), v)
            })
            .collect(),
    ));
    let e6: Vec<(lb6_key, lb_service)> = lb.entries("weir_lb6_svc").unwrap();
    sections.push((
        "weir_lb6_svc",
        e6.iter()
            .map(|(k, v)| {
                let at = format!("[{}]:{}", v6(k.address), u16::from_be(k.dport));
                svc_line(&at, (k.proto, k.scope, k.slot), v)
            })
            .collect(),
    ));
    let b4: Vec<(u32, lb4_backend)> = lb.entries("weir_lb4_backends").unwrap();
    sections.push((
        "weir_lb4_backends",
        b4.iter()
            .map(|(id, b)| {
                let port = u16::from_be(b.port);
                format!(
                    "{id} => {}:{port}/{} flags {:#x}",
                    v4(b.address),
                    proto(b.proto),
                    b.flags
                )
            })
            .collect(),
    ));
    let b6: Vec<(u32, lb6_backend)> = lb.entries("weir_lb6_backends").unwrap();
    sections.push((
        "weir_lb6_backends",
        b6.iter()
            .map(|(id, b)| {
                let port = u16::from_be(b.port);
                format!(
                    "{id} => [{}]:{port}/{} flags {:#x}",
                    v6(b.address),
                    proto(b.proto),
                    b.flags
                )
            })
            .collect(),
    ));
    let am: Vec<(lb_affinity_match, u8)> = lb.entries("weir_lb_affinity_match").unwrap();
    sections.push((
        "weir_lb_affinity_match",
        am.iter()
            .map(|(k, _)| format!("svc {} backend {}", k.svc_id, k.backend_id))
            .collect(),
    ));
    let sr: Vec<(lb4_src_range_key, u8)> = lb.entries("weir_lb4_src_range").unwrap();
    sections.push((
        "weir_lb4_src_range",
        sr.iter()
            .map(|(k, _)| format!("svc {} {}/{}", k.svc_id, v4(k.addr), k.prefixlen - 32))
            .collect(),
    ));
    let gr: Vec<(u32, lb_groups)> = lb.entries("weir_lb_groups").unwrap();
    sections.push((
        "weir_lb_groups",
        gr.iter()
            .map(|(id, g)| {
                let groups: Vec<String> = g.g[..g.n as usize]
                    .iter()
                    .map(|x| format!("slots {}+{} upto {}", x.first, x.count, x.upto))
                    .collect();
                format!("svc {id} => total {}: {}", g.total, groups.join(", "))
            })
            .collect(),
    ));
    let ol: Vec<(u32, lb_outlier)> = lb.entries("weir_lb_outlier").unwrap();
    sections.push((
        "weir_lb_outlier",
        ol.iter()
            .map(|(id, o)| format!("backend {id} => {} failures, {} ms", o.threshold, o.base_ms))
            .collect(),
    ));
    let mut out = String::new();
    for (name, mut lines) in sections {
        lines.sort();
        out.push_str(&format!("# {name}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// The eBPF rendering of the fixtures: the load-balancing maps' contents after a first apply
/// (into maps of the test's own; no program attached).
#[test]
fn ebpf_map_contents_match_the_golden_file() {
    use weir_dataplane::Dataplane;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/weir-golden-{}",
        std::process::id()
    )));
    let mut dp = weir_dataplane::ebpf::EbpfDataplane::new_with(
        &pins.0,
        std::path::Path::new("/nonexistent"),
        false,
    )
    .unwrap();
    dp.apply(&fixture_state()).unwrap();
    golden("ebpf.txt", &map_contents(dp.lb()));
}
