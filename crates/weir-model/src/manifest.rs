//! Reading manifests: multi-document YAML or JSON, with `kind: List` expanded.

use serde::Deserialize;
use serde_json::Value;

/// A manifest could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {index}: {message}")]
pub struct ManifestError {
    /// File name (or `-` for standard input).
    pub source_name: String,
    /// 1-based document number in the file.
    pub index: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses every document of `text` (YAML or JSON) into JSON values, expanding `List` kinds
/// and skipping empty documents.
pub fn parse_documents(source_name: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // Through serde_yaml's own Value first: it refuses duplicate keys (as kubectl does),
        // where two documents missing a `---` between them would otherwise merge silently.
        let err = |message: String| ManifestError {
            source_name: source_name.to_string(),
            index: i + 1,
            message,
        };
        let yaml = serde_yaml::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        let value = serde_json::to_value(yaml).map_err(|e| err(e.to_string()))?;
        match value {
            Value::Null => {}
            Value::Object(ref m)
                if m.get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List"))
                    && m.get("items").is_some() =>
            {
                for item in m["items"].as_array().into_iter().flatten() {
                    out.push(item.clone());
                }
            }
            Value::Object(_) => out.push(value),
            other => {
                return Err(ManifestError {
                    source_name: source_name.to_string(),
                    index: i + 1,
                    message: format!("expected an object, found {other}"),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_doc_and_lists() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{\"kind\":\"Pod\"},{\"kind\":\"Service\"}]}\n";
        let docs = parse_documents("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2]["kind"], "Service");
        assert!(parse_documents("f", "- a\n")
            .unwrap_err()
            .to_string()
            .starts_with("f: document 1"));
    }
}
