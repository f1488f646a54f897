//! Where a plugin configuration comes from: a plain JSON file, an Envoy bootstrap (YAML or
//! JSON) whose keygate wasm filter carries it as `configuration`, or an Istio `WasmPlugin`
//! manifest (`spec.pluginConfig`), possibly among other YAML documents.

use crate::exit::{read_input, Failure};
use crate::json::Json;
use serde::Deserialize;

/// `@type` of Envoy's wasm HTTP filter configuration.
const WASM_FILTER: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";

/// One plugin configuration found in a file.
#[derive(Debug, Clone)]
pub struct Found {
    /// Where it was found, as a path in the file (`""` for a plain JSON configuration), e.g.
    /// `static_resources.listeners[0]…typed_config.config.configuration.value` or, in the
    /// second YAML document, `[1].spec.pluginConfig`.
    pub location: String,
    /// The configuration as JSON: the file's own bytes for a plain file or an Envoy
    /// `StringValue`, else the YAML value written as JSON (members in their order).
    pub json: Vec<u8>,
    /// The configuration as an order-preserving value, when it is valid JSON.
    pub value: Option<Json>,
}

/// Reads `file` (`-`: stdin) and finds every keygate configuration in it.
pub fn read(file: &str) -> Result<Vec<Found>, Failure> {
    let data = read_input(file)?;
    find(&data).map_err(|e| Failure::Invalid(format!("{file}: {e}")))
}

/// Reads `file` and picks its one keygate configuration (the first, with a note on stderr,
/// when there are several).
pub fn read_one(file: &str) -> Result<Found, Failure> {
    let mut all = read(file)?;
    if all.len() > 1 {
        let places: Vec<&str> = all.iter().map(|f| f.location.as_str()).collect();
        eprintln!(
            "keygate: note: {file} holds {} keygate configurations; using the first, at {}",
            all.len(),
            places.first().copied().unwrap_or("")
        );
    }
    if all.is_empty() {
        return Err(Failure::Invalid(format!(
            "{file}: no keygate configuration found"
        )));
    }
    Ok(all.swap_remove(0))
}

fn looks_like_plain(v: &Json) -> bool {
    match v {
        Json::Object(m) => {
            m.iter().any(|(k, _)| k == "key_list")
                || !m.iter().any(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "static_resources"
                            | "dynamic_resources"
                            | "admin"
                            | "node"
                            | "apiVersion"
                            | "kind"
                            | "spec"
                            | "layered_runtime"
                            | "overload_manager"
                    )
                })
        }
        _ => true,
    }
}

/// The keygate configurations in a file's bytes.
pub fn find(data: &[u8]) -> Result<Vec<Found>, String> {
    let body = data.strip_prefix(b"\xef\xbb\xbf").unwrap_or(data);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') || first.is_none() {
        match serde_json::from_slice::<Json>(body) {
            // Not JSON at all: the filter's own parser words the error.
            Err(_) => {
                return Ok(vec![Found {
                    location: String::new(),
                    json: data.to_vec(),
                    value: None,
                }])
            }
            Ok(v) if looks_like_plain(&v) => {
                return Ok(vec![Found {
                    location: String::new(),
                    json: data.to_vec(),
                    value: Some(v),
                }])
            }
            Ok(v) => return search_documents(vec![v]),
        }
    }
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_slice(body) {
        let v = Json::deserialize(doc).map_err(|e| format!("not JSON or YAML: {e}"))?;
        if v != Json::Null {
            docs.push(v);
        }
    }
    search_documents(docs)
}

/// A candidate: where, whether it names keygate, and the configuration.
struct Candidate {
    keygate: bool,
    found: Result<Found, String>,
}

fn search_documents(docs: Vec<Json>) -> Result<Vec<Found>, String> {
    let many = docs.len() > 1;
    let mut candidates = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let prefix = if many {
            format!("[{i}]")
        } else {
            String::new()
        };
        if doc.get("kind").and_then(Json::as_str) == Some("WasmPlugin") {
            candidates.push(wasm_plugin(doc, &prefix));
        } else {
            walk(doc, &prefix, &mut candidates);
        }
    }
    if candidates.is_empty() {
        return Err("no keygate configuration found: expected a plain JSON configuration (with \"key_list\"), an Envoy bootstrap with the wasm HTTP filter (configuration.value), or an Istio WasmPlugin (spec.pluginConfig)".into());
    }
    let keygate: Vec<&Candidate> = candidates.iter().filter(|c| c.keygate).collect();
    let chosen: Vec<&Candidate> = if !keygate.is_empty() {
        keygate
    } else if candidates.len() == 1 {
        candidates.iter().collect()
    } else {
        return Err(format!(
            "{} wasm filters found and none is named keygate (name, root_id, vm_id, the .wasm file name or the WasmPlugin's name)",
            candidates.len()
        ));
    };
    chosen
        .into_iter()
        .map(|c| c.found.clone())
        .collect::<Result<Vec<_>, _>>()
}

fn names_keygate(s: Option<&Json>) -> bool {
    s.and_then(Json::as_str)
        .is_some_and(|s| s.to_ascii_lowercase().contains("keygate"))
}

fn wasm_plugin(doc: &Json, prefix: &str) -> Candidate {
    let spec = doc.get("spec");
    let keygate = names_keygate(doc.get("metadata").and_then(|m| m.get("name")))
        || names_keygate(spec.and_then(|s| s.get("pluginName")))
        || names_keygate(spec.and_then(|s| s.get("url")));
    let location = format!(
        "{prefix}{}spec.pluginConfig",
        if prefix.is_empty() { "" } else { "." }
    );
    let found = match spec.and_then(|s| s.get("pluginConfig")) {
        None => Err(format!(
            "{location}: missing (the WasmPlugin has no configuration)"
        )),
        Some(v) => serde_json::to_vec_pretty(v)
            .map(|json| Found {
                location: location.clone(),
                json,
                value: Some(v.clone()),
            })
            .map_err(|e| format!("{location}: {e}")),
    };
    Candidate { keygate, found }
}

/// Finds every wasm HTTP filter configuration under `v`.
fn walk(v: &Json, path: &str, out: &mut Vec<Candidate>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Json::Object(members) => {
            let is_wasm = v
                .get("@type")
                .and_then(Json::as_str)
                .is_some_and(|t| t.ends_with(WASM_FILTER));
            if is_wasm {
                out.push(wasm_filter(v, path));
                return;
            }
            for (k, child) in members {
                walk(child, &join(k), out);
            }
        }
        Json::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn wasm_filter(v: &Json, path: &str) -> Candidate {
    let config = v.get("config");
    let vm = config.and_then(|c| c.get("vm_config"));
    let keygate = names_keygate(config.and_then(|c| c.get("name")))
        || names_keygate(config.and_then(|c| c.get("root_id")))
        || names_keygate(vm.and_then(|m| m.get("vm_id")))
        || names_keygate(
            vm.and_then(|m| m.get("code"))
                .and_then(|c| c.get("local"))
                .and_then(|l| l.get("filename")),
        );
    let base = if path.is_empty() {
        "config.configuration".to_string()
    } else {
        format!("{path}.config.configuration")
    };
    let found = match config.and_then(|c| c.get("configuration")) {
        None => Err(format!(
            "{base}: missing (the wasm filter has no configuration)"
        )),
        Some(Json::String(s)) => Ok(plain_string(s, base.clone())),
        Some(c) => match c.get("value") {
            Some(Json::String(s)) => Ok(plain_string(s, format!("{base}.value"))),
            _ => Err(format!(
                "{base}: expected a google.protobuf.StringValue with a \"value\" holding the JSON"
            )),
        },
    };
    Candidate { keygate, found }
}

fn plain_string(s: &str, location: String) -> Found {
    Found {
        location,
        json: s.as_bytes().to_vec(),
        value: serde_json::from_str(s).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"key_list":{"cluster":"ks","path":"/v1/keys"}}"#;

    #[test]
    fn plain_json_is_taken_as_it_is() {
        let f = find(CONFIG.as_bytes()).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].location, "");
        assert_eq!(f[0].json, CONFIG.as_bytes());
        // Broken JSON too: the filter's parser words the error.
        let f = find(b"{\"key_list\": ").unwrap();
        assert_eq!(f[0].json, b"{\"key_list\": ");
    }

    #[test]
    fn envoy_bootstrap_yaml() {
        let yaml = format!(
            r#"
static_resources:
  listeners:
  - name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          http_filters:
          - name: other
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config: {{name: other, configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: "{{}}"}}}}
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: keygate
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{CONFIG}'
"#
        );
        let f = find(yaml.as_bytes()).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].json, CONFIG.as_bytes());
        assert_eq!(
            f[0].location,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[1].typed_config.config.configuration.value"
        );
    }

    #[test]
    fn istio_wasm_plugin_among_other_documents() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: keygate}
spec:
  pluginConfig:
    key_list: {cluster: ks, path: /v1/keys, refresh_s: 30}
    credentials: [{header: x-api-key}]
"#;
        let f = find(yaml.as_bytes()).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].location, "[1].spec.pluginConfig");
        let c = keygate_core::config::parse(&f[0].json).unwrap();
        assert_eq!(c.key_list.refresh_s, 30);
        assert!(find(b"kind: Service\n").is_err());
    }
}
