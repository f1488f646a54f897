//! Route rules (SPEC §3 step 11) compiled into a segment trie, so finding the first matching rule
//! costs a walk down the request path's segments instead of a scan of every rule.

use crate::path;
use std::collections::HashMap;

/// How a rule matches the normalised path (SPEC §3: `path_prefix` by whole segments, `path_exact`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl PathMatch {
    /// `normalized` must come from `path::normalize`.
    pub fn matches(&self, normalized: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path::prefix_matches(p, normalized),
            PathMatch::Exact(p) => p == normalized,
        }
    }
}

/// One `routes` rule of the configuration (SPEC §3 step 11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    pub methods: Vec<String>,
    pub scope: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Node {
    children: HashMap<String, Node>,
    /// Indices of `path_prefix` rules ending at this node, ascending.
    prefix_rules: Vec<usize>,
}

/// The rules in configuration order plus the indexes that find the first match quickly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    rules: Vec<Route>,
    prefixes: Node,
    /// `path_exact` rules by their normalised path, indices ascending.
    exact: HashMap<String, Vec<usize>>,
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

impl RouteTable {
    pub fn new(rules: Vec<Route>) -> RouteTable {
        let mut table = RouteTable {
            rules: Vec::new(),
            prefixes: Node::default(),
            exact: HashMap::new(),
        };
        for (i, r) in rules.iter().enumerate() {
            match &r.path {
                PathMatch::Exact(p) => table.exact.entry(p.clone()).or_default().push(i),
                PathMatch::Prefix(p) => {
                    let mut node = &mut table.prefixes;
                    for seg in segments(p) {
                        node = node.children.entry(seg.to_string()).or_default();
                    }
                    node.prefix_rules.push(i);
                }
            }
        }
        table.rules = rules;
        table
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule, in configuration order, matching the method and the normalised path.
    pub fn find(&self, method: &str, path: &str) -> Option<&Route> {
        if self.rules.is_empty() {
            return None;
        }
        let method_ok = |i: &&usize| {
            self.rules.get(**i).is_some_and(|r| {
                let m = &r.methods;
                m.is_empty() || m.iter().any(|x| x == method)
            })
        };
        let mut best = self
            .exact
            .get(path)
            .and_then(|ids| ids.iter().find(method_ok).copied());
        let mut node = &self.prefixes;
        let mut consider = |node: &Node| {
            if let Some(i) = node.prefix_rules.iter().find(method_ok) {
                best = Some(best.map_or(*i, |b| b.min(*i)));
            }
        };
        consider(node);
        for seg in segments(path) {
            match node.children.get(seg) {
                Some(child) => {
                    node = child;
                    consider(node);
                }
                None => break,
            }
        }
        best.and_then(|i| self.rules.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path;

    fn route(p: &str, exact: bool, methods: &[&str], scope: &str) -> Route {
        let n = path::normalize(p);
        Route {
            path: if exact {
                PathMatch::Exact(n)
            } else {
                PathMatch::Prefix(n)
            },
            methods: methods.iter().map(|m| m.to_string()).collect(),
            scope: Some(scope.to_string()),
        }
    }

    /// The SPEC's definition: the first rule in order whose path and methods match.
    fn linear<'a>(rules: &'a [Route], method: &str, p: &str) -> Option<&'a Route> {
        rules.iter().find(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m == method)) && r.path.matches(p)
        })
    }

    #[test]
    fn first_match_in_configuration_order() {
        let rules = vec![
            route("/public/v1/contacts", false, &["POST"], "contacts:write"),
            route("/public/v1/contacts", false, &[], "contacts:read"),
            route("/public", false, &[], "public"),
            route("/public/v1/contacts/export", true, &[], "export"),
            route("/", false, &["DELETE"], "admin"),
        ];
        let t = RouteTable::new(rules.clone());
        let scope = |m: &str, p: &str| t.find(m, p).and_then(|r| r.scope.clone());
        assert_eq!(
            scope("POST", "/public/v1/contacts").as_deref(),
            Some("contacts:write")
        );
        assert_eq!(
            scope("GET", "/public/v1/contacts/7").as_deref(),
            Some("contacts:read")
        );
        assert_eq!(
            scope("GET", "/public/v1/contacts/export").as_deref(),
            Some("contacts:read")
        );
        assert_eq!(
            scope("GET", "/public/v1/contactsx").as_deref(),
            Some("public")
        );
        assert_eq!(scope("DELETE", "/other").as_deref(), Some("admin"));
        assert_eq!(scope("GET", "/other"), None);
        for (m, p) in [
            ("GET", "/public/v1/contacts/export"),
            ("PUT", "/x"),
            ("DELETE", "/public"),
        ] {
            assert_eq!(t.find(m, p), linear(&rules, m, p));
        }
    }

    #[test]
    fn agrees_with_a_linear_scan_on_many_rules() {
        let mut rules = Vec::new();
        for i in 0..500 {
            let p = format!("/api/v{}/r{}/{}", i % 3, i % 17, i % 5);
            let methods: &[&str] = match i % 4 {
                0 => &["GET"],
                1 => &["POST", "PUT"],
                _ => &[],
            };
            rules.push(route(&p, i % 7 == 0, methods, &format!("s{i}")));
        }
        let t = RouteTable::new(rules.clone());
        for i in 0..2000 {
            let p = format!("/api/v{}/r{}/{}/x{}", i % 4, i % 19, i % 6, i % 2);
            let p = if i % 3 == 0 {
                p.rsplit_once('/').map(|(a, _)| a.to_string()).unwrap_or(p)
            } else {
                p
            };
            for m in ["GET", "POST", "DELETE"] {
                assert_eq!(t.find(m, &p), linear(&rules, m, &p), "{m} {p}");
            }
        }
    }
}
