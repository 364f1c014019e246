//! Which of the API server's kinds are served: kube-apiserver's `--runtime-config`
//! (`v1=false`, `GROUP/VERSION=false`, `GROUP/VERSION/RESOURCE=false`). A kind turned off is
//! answered 404 and left out of discovery, as a cluster without its CRD installed answers.

use weir_model::kinds::{self, ResourceKind};

/// The group/versions and resources turned off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// (group, version, resource): `None` turns the whole group/version off.
    off: Vec<(String, String, Option<String>)>,
}

impl RuntimeConfig {
    /// Parses `KEY=VALUE,...` as kube-apiserver's `--runtime-config` does: a key is `v1` or
    /// `api/v1` (the core group), `GROUP/VERSION` or `GROUP/VERSION/RESOURCE`; the value is
    /// `true` or `false` (empty means `true`). A later entry overrides an earlier one for the
    /// same key. A key naming nothing this server serves is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cfg = RuntimeConfig::default();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            let on = match value {
                "" | "true" => true,
                "false" => false,
                v => {
                    return Err(format!(
                        "--runtime-config {key}: {v:?} is not true or false"
                    ))
                }
            };
            let parts: Vec<&str> = key.split('/').collect();
            let (group, version, resource) = match parts.as_slice() {
                ["v1"] | ["api", "v1"] => ("", "v1", None),
                [g, v] => (*g, *v, None),
                [g, v, r] => (*g, *v, Some(r.to_string())),
                _ => {
                    return Err(format!(
                        "--runtime-config {key}: not v1, GROUP/VERSION or GROUP/VERSION/RESOURCE"
                    ))
                }
            };
            let known = kinds::ALL.iter().any(|k| {
                k.group == group
                    && k.version == version
                    && resource.as_deref().is_none_or(|r| r == k.plural)
            });
            if !known {
                return Err(format!(
                    "--runtime-config {key}: this server does not serve it"
                ));
            }
            let k = (group.to_string(), version.to_string(), resource);
            cfg.off.retain(|o| *o != k);
            if !on {
                cfg.off.push(k);
            }
        }
        Ok(cfg)
    }

    /// Whether `kind` is served.
    pub fn serves(&self, kind: &ResourceKind) -> bool {
        !self.off.iter().any(|(g, v, r)| {
            g == kind.group && v == kind.version && r.as_deref().is_none_or(|r| r == kind.plural)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_off_groups_and_resources() {
        let c = RuntimeConfig::parse(
            "multicluster.x-k8s.io/v1beta1=false, weir.dev/v1alpha1/remotenodes=false",
        )
        .unwrap();
        assert!(!c.serves(&kinds::SERVICE_IMPORT));
        assert!(!c.serves(&kinds::SERVICE_EXPORT));
        assert!(c.serves(&kinds::SERVICE_IMPORT_V1ALPHA1));
        assert!(!c.serves(&kinds::REMOTE_NODE));
        assert!(c.serves(&kinds::REMOTE_ENDPOINT));
        assert!(c.serves(&kinds::SERVICE));
        // Turned back on by a later entry; the core group by either of its names.
        let c = RuntimeConfig::parse("api/v1=false,v1=true,weir.dev/v1alpha1=false").unwrap();
        assert!(c.serves(&kinds::POD));
        assert!(!c.serves(&kinds::SECURITY_IDENTITY));
        assert!(RuntimeConfig::parse("").unwrap().serves(&kinds::POD));
    }

    #[test]
    fn bad_entries_name_the_key() {
        let e = RuntimeConfig::parse("apps/v1=false").unwrap_err();
        assert!(e.contains("apps/v1") && e.contains("does not serve"), "{e}");
        let e = RuntimeConfig::parse("v1=no").unwrap_err();
        assert!(e.contains("\"no\""), "{e}");
        let e = RuntimeConfig::parse("a/b/c/d=false").unwrap_err();
        assert!(e.contains("a/b/c/d"), "{e}");
    }
}
