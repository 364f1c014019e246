//! `weir get`: objects as tables (the columns kube-apiserver uses), JSON or YAML.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use kube::api::ListParams;
use serde_json::{json, Value};
use weir_lab::client;
use weir_model::{kinds, print};

/// Arguments of `weir get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// Kind: services, endpointslices, pods, namespaces, nodes, networkpolicies (or short
    /// names: svc, po, ns, no, netpol).
    kind: String,
    /// One object's name.
    name: Option<String>,
    /// Namespace.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// All namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Label selector, e.g. app=web,tier!=db.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Output format. `wide` adds columns; for networkpolicies, what weir compiles: the
    /// directions isolated, the pods selected, rules compiled and anything not enforced as
    /// written.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

/// Renders rows under headers with columns padded like kubectl's (three spaces apart).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Every NetworkPolicy's status as the agents compile it, from the cluster's Pods,
/// Namespaces and NetworkPolicies, by (namespace, name).
async fn policy_statuses(
    c: &kube::Client,
) -> Result<BTreeMap<(String, String), weir_control::policy::PolicyStatus>> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let lp = ListParams::default();
    let pods = kube::Api::<Pod>::all(c.clone()).list(&lp).await?.items;
    let namespaces = kube::Api::<Namespace>::all(c.clone())
        .list(&lp)
        .await?
        .items;
    let policies = kube::Api::<NetworkPolicy>::all(c.clone())
        .list(&lp)
        .await?
        .items;
    let cluster = weir_control::policy::Cluster::from_objects(&namespaces, &pods, &policies);
    Ok(cluster
        .statuses()
        .into_iter()
        .map(|st| ((st.namespace.clone(), st.name.clone()), st))
        .collect())
}

/// The wide columns of a NetworkPolicy: policy types, selected pods (three named, as
/// kubectl shortens endpoint lists), rules compiled, warnings.
fn policy_cells(st: &weir_control::policy::PolicyStatus) -> Vec<String> {
    let types: Vec<&str> = [(st.ingress, "Ingress"), (st.egress, "Egress")]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, t)| t)
        .collect();
    let mut selected = st
        .selected
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if st.selected.len() > 3 {
        selected.push_str(&format!(" + {} more...", st.selected.len() - 3));
    }
    vec![
        if types.is_empty() {
            "<none>".into()
        } else {
            types.join(",")
        },
        if selected.is_empty() {
            "<none>".into()
        } else {
            selected
        },
        st.rules.to_string(),
        if st.warnings.is_empty() {
            "<none>".into()
        } else {
            st.warnings.join("; ")
        },
    ]
}

/// Runs `weir get`; `mesh` is the cluster's mesh status when it can be read (a lab cluster of
/// a clusterset), for the wide columns of ServiceImports.
pub async fn run(
    c: &kube::Client,
    a: &GetArgs,
    mesh: Option<&weir_mesh::MeshStatus>,
) -> Result<()> {
    let kind = kinds::by_cli_name(&a.kind).ok_or_else(|| {
        anyhow!("the server doesn't have a resource type {:?} (kinds: services, endpointslices, pods, namespaces, nodes, networkpolicies)", a.kind)
    })?;
    let ns = if a.all_namespaces {
        None
    } else {
        Some(a.namespace.as_str())
    };
    let api = if a.all_namespaces && kind.namespaced {
        kube::Api::all_with(c.clone(), &client::api_resource(kind))
    } else {
        client::dynamic_api(c, kind, ns)
    };
    let objects: Vec<Value> = match &a.name {
        Some(name) => {
            let o =
                api.get_opt(name)
                    .await?
                    .ok_or_else(|| match ns.filter(|_| kind.namespaced) {
                        Some(ns) => {
                            anyhow!("{} {name:?} not found in namespace {ns:?}", kind.plural)
                        }
                        None => anyhow!("{} {name:?} not found", kind.plural),
                    })?;
            vec![serde_json::to_value(o)?]
        }
        None => {
            let mut lp = ListParams::default();
            if let Some(s) = &a.selector {
                weir_model::LabelSelector::parse(s).map_err(|e| anyhow!("--selector: {e}"))?;
                lp = lp.labels(s);
            }
            api.list(&lp)
                .await?
                .items
                .into_iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?
        }
    };
    match a.output {
        Output::Json | Output::Yaml => {
            let v = if a.name.is_some() {
                objects.into_iter().next().unwrap_or(Value::Null)
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": objects, "metadata": {"resourceVersion": ""}})
            };
            if a.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", serde_yaml::to_string(&v)?);
            }
        }
        Output::Table | Output::Wide => {
            if objects.is_empty() {
                match ns.filter(|_| kind.namespaced) {
                    Some(ns) => eprintln!("No resources found in {ns} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(());
            }
            let wide = a.output == Output::Wide;
            let cols = print::columns(kind);
            let keep: Vec<usize> = cols
                .iter()
                .enumerate()
                .filter(|(_, c)| wide || c.priority == 0)
                .map(|(i, _)| i)
                .collect();
            let mut headers: Vec<String> = Vec::new();
            let with_ns = a.all_namespaces && kind.namespaced;
            if with_ns {
                headers.push("NAMESPACE".into());
            }
            headers.extend(keep.iter().map(|i| cols[*i].name.to_uppercase()));
            let now = jiff::Timestamp::now();
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    let cells = print::row(kind, o, now);
                    let mut r = Vec::new();
                    if with_ns {
                        r.push(
                            o.pointer("/metadata/namespace")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        );
                    }
                    r.extend(keep.iter().map(|i| cells[*i].clone()));
                    r
                })
                .collect();
            let mut rows = rows;
            if wide && kind.kind == kinds::NETWORK_POLICY.kind {
                let statuses = policy_statuses(c).await?;
                headers.extend(["POLICY-TYPES", "SELECTED", "RULES", "WARNINGS"].map(String::from));
                for (o, r) in objects.iter().zip(rows.iter_mut()) {
                    r.extend(match statuses.get(&weir_model::namespaced_name(o)) {
                        Some(st) => policy_cells(st),
                        None => vec!["<unknown>".into(); 4],
                    });
                }
            }
            if wide && kind.kind == kinds::SERVICE_IMPORT.kind {
                let infos = crate::imports::list(c, ns.filter(|_| !a.all_namespaces)).await?;
                headers
                    .extend(["CLUSTERS", "ENDPOINTS", "CONFLICTS", "DATA-AGE"].map(String::from));
                for (o, r) in objects.iter().zip(rows.iter_mut()) {
                    let key = weir_model::namespaced_name(o);
                    match infos
                        .iter()
                        .find(|i| (i.namespace.clone(), i.name.clone()) == key)
                    {
                        Some(i) => r.extend(crate::imports::wide_cells(i, mesh, now)),
                        None => r.extend(vec!["<unknown>".to_string(); 4]),
                    }
                }
            }
            let h: Vec<&str> = headers.iter().map(String::as_str).collect();
            print!("{}", render_table(&h, &rows));
        }
    }
    Ok(())
}
