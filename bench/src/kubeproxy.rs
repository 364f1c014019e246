//! kube-proxy's iptables and nftables layouts for N ClusterIP services with 3 endpoints each,
//! as pkg/proxy/{iptables,nftables}/proxier.go write them (see shared/reference/
//! kube-proxy-rules.md): chain names from base32(sha256(...)), the statistic probabilities,
//! comments (dropped above 1000 endpoints, as kube-proxy's large-cluster mode does), and
//! nftables verdict maps.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// One service of the benchmark.
pub struct Svc {
    /// `bench/svc-i:http`.
    pub name: String,
    /// ClusterIP.
    pub vip: String,
    /// Endpoints `ip:port`.
    pub endpoints: Vec<(String, u16)>,
    /// The NodePort, for a NodePort Service (externalTrafficPolicy: Cluster).
    pub node_port: Option<u16>,
}

fn base32(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buf: u64 = 0;
    let mut bits = 0;
    for b in data {
        buf = (buf << 8) | *b as u64;
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn hash16(s: &str) -> String {
    base32(&Sha256::digest(s.as_bytes()))[..16].to_string()
}

fn hash8(s: &str) -> String {
    base32(&Sha256::digest(s.as_bytes()))[..8].to_string()
}

/// The iptables-restore input for `svcs` (nat and filter tables), the target service being
/// the last one in KUBE-SERVICES (kube-proxy's order is random; last is the worst case).
pub fn iptables(svcs: &[Svc], cluster_cidr: &str) -> String {
    let large = svcs.iter().map(|s| s.endpoints.len()).sum::<usize>() > 1000;
    let mut chains = String::new();
    let mut rules = String::new();
    for s in svcs {
        let svc_chain = format!("KUBE-SVC-{}", hash16(&format!("{}tcp", s.name)));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(rules, "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport 80 -j {svc_chain}", s.name, s.vip);
        let _ = writeln!(rules, "-A {svc_chain} -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport 80 ! -s {cluster_cidr} -j KUBE-MARK-MASQ", s.name, s.vip);
        if let Some(np) = s.node_port {
            // externalTrafficPolicy: Cluster: masquerade, then the service chain.
            let ext_chain = format!("KUBE-EXT-{}", hash16(&format!("{}tcp", s.name)));
            let _ = writeln!(chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(rules, "-A KUBE-NODEPORTS -m comment --comment {} -m tcp -p tcp --dport {np} -j {ext_chain}", s.name);
            let _ = writeln!(rules, "-A {ext_chain} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ", s.name);
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        }
        let n = s.endpoints.len();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", hash16(&format!("{}tcp{ip}:{port}", s.name)));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment = if large {
                String::new()
            } else {
                format!("-m comment --comment \"{} -> {ip}:{port}\" ", s.name)
            };
            if i + 1 < n {
                let _ = writeln!(rules, "-A {svc_chain} {comment}-m statistic --mode random --probability {:.10} -j {sep}", 1.0 / (n - i) as f64);
            } else {
                let _ = writeln!(rules, "-A {svc_chain} {comment}-j {sep}");
            }
            let c = if large {
                String::new()
            } else {
                format!("-m comment --comment {} ", s.name)
            };
            let _ = writeln!(rules, "-A {sep} {c}-s {ip} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A {sep} {c}-m tcp -p tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    format!(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n{chains}-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n{rules}-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"
    )
}

/// The jump rules kube-proxy prepends (with `-I`), as iptables commands' arguments.
pub fn iptables_jumps() -> Vec<Vec<&'static str>> {
    vec![
        vec![
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
        vec![
            "-t",
            "nat",
            "-I",
            "OUTPUT",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
        vec![
            "-t",
            "nat",
            "-I",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes postrouting rules",
            "-j",
            "KUBE-POSTROUTING",
        ],
        vec![
            "-t",
            "filter",
            "-I",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
        vec![
            "-t",
            "filter",
            "-I",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "kubernetes forwarding rules",
            "-j",
            "KUBE-FORWARD",
        ],
    ]
}

/// The `nft -f` input for `svcs`.
pub fn nftables(svcs: &[Svc], cluster_cidr: &str, service_cidr: &str) -> String {
    let mut s = String::new();
    let base = format!(
        "add table ip kube-proxy {{ comment \"rules for kube-proxy\" ; }}
add set ip kube-proxy cluster-ips {{ type ipv4_addr ; }}
add set ip kube-proxy nodeport-ips {{ type ipv4_addr ; }}
add map ip kube-proxy firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add map ip kube-proxy no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}
add map ip kube-proxy no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add map ip kube-proxy service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add map ip kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; }}
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
add chain ip kube-proxy filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
add chain ip kube-proxy filter-forward {{ type filter hook forward priority 0 ; }}
add chain ip kube-proxy filter-input {{ type filter hook input priority 0 ; }}
add chain ip kube-proxy filter-output {{ type filter hook output priority 0 ; }}
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output {{ type nat hook output priority -100 ; }}
add chain ip kube-proxy nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule ip kube-proxy cluster-ips-check ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"
    );
    s.push_str(&base);
    for svc in svcs {
        let b = format!("{}/tcp/http", svc.name.replace(":http", ""));
        let chain = format!("service-{}-{b}", hash8(&b));
        let _ = writeln!(s, "add chain ip kube-proxy {chain}");
        let _ = writeln!(s, "add rule ip kube-proxy {chain} ip daddr {} ip saddr != {cluster_cidr} jump mark-for-masquerade", svc.vip);
        let mut vmap = Vec::new();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let eb = format!("{b}__{ip}/{port}");
            let ec = format!("endpoint-{}-{eb}", hash8(&eb));
            let _ = writeln!(s, "add chain ip kube-proxy {ec}");
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {ec} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {ec} meta l4proto tcp dnat to {ip}:{port}"
            );
            vmap.push(format!("{i} : goto {ec}"));
        }
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(s, "add element ip kube-proxy cluster-ips {{ {} }}", svc.vip);
        let _ = writeln!(
            s,
            "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {chain} }}",
            svc.vip
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy_test_vectors() {
        // From shared/reference/kube-proxy-rules.md (computed with kube-proxy's formula).
        assert_eq!(hash16("bench/svc-0:httptcp"), "DARI5RCMN2KZWPPO");
        assert_eq!(
            hash16("bench/svc-0:httptcp10.244.1.2:8080"),
            "RM4OYAWE7K43RTNI"
        );
        assert_eq!(hash8("bench/svc-0/tcp/http"), "O6UKKYV4");
    }

    #[test]
    fn node_port_rules_are_kube_proxys() {
        let svc = Svc {
            name: "bench/svc-0:http".into(),
            vip: "10.96.0.10".into(),
            endpoints: vec![("10.244.1.2".into(), 8080)],
            node_port: Some(30080),
        };
        let out = iptables(&[svc], "10.244.0.0/16");
        for line in [
            ":KUBE-EXT-DARI5RCMN2KZWPPO - [0:0]",
            "-A KUBE-NODEPORTS -m comment --comment bench/svc-0:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-DARI5RCMN2KZWPPO",
            "-A KUBE-EXT-DARI5RCMN2KZWPPO -m comment --comment \"masquerade traffic for bench/svc-0:http external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-DARI5RCMN2KZWPPO -j KUBE-SVC-DARI5RCMN2KZWPPO",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}");
        }
    }
}
