//! How request edits reach the upstream under ngx_wasm_module, where they differ from Envoy:
//! removing a header only zeroes its hash and nginx's proxy module still forwards it, and the
//! whole-map setter stops silently at the read-only `:scheme`. So nothing is removed: identity
//! goes out through the nginx variables `$keygate_key_id` / `$keygate_key_owner`, which the
//! configuration sends with `proxy_set_header` (dropping every client-sent copy); a consumed
//! credential header is blanked in place; the query is rewritten through `$args`. It also ignores
//! the offset of a buffer read, so the key list cannot be read in chunks there (see `root`).

use keygate_core::config::Config;
use keygate_core::decision::Outcome;
use proxy_wasm::hostcalls;

/// The host, learnt on a VM's first request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Envoy,
    /// nginx whose configuration declares the variables of every identity header in use.
    Nginx,
    /// nginx without them: a client-sent identity header would reach the upstream (nginx
    /// cannot remove a request header), so every request that would go upstream is refused
    /// `unavailable` instead (fail closed; refusing the configuration would stop the workers).
    NginxUnmapped,
}

/// Which host this VM runs in: ngx_wasm_module answers the `ngx.*` properties. Says once, at
/// error level, what the configuration lacks.
pub fn detect(cfg: &Config) -> Host {
    if property(&["ngx", "nginx_version"]).is_none() {
        return Host::Envoy;
    }
    let missing =
        |header: &Option<String>, var: &str| header.is_some() && property(&["ngx", var]).is_none();
    if missing(&cfg.key_id_header, "keygate_key_id")
        || missing(&cfg.owner_header, "keygate_key_owner")
    {
        log::error!(
            "keygate: nginx without `set $keygate_key_id \"\"; set $keygate_key_owner \"\";` at \
             server level (and their proxy_set_header lines): client-sent identity headers would \
             reach the upstream, so every request that would go upstream is refused 503 \
             unavailable (see envoy/examples/nginx/README.md)"
        );
        return Host::NginxUnmapped;
    }
    Host::Nginx
}

fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

pub fn apply(cfg: &Config, headers: &[(&str, &[u8])], outcome: &Outcome) {
    // Setting an undeclared variable traps the VM: `detect` made sure the ones in use are
    // declared (else the request was refused, `Host::NginxUnmapped`).
    for (name, value) in &outcome.set_headers {
        let var = if Some(name) == cfg.key_id_header.as_ref() {
            "keygate_key_id"
        } else {
            "keygate_key_owner"
        };
        let _ = hostcalls::set_property(vec!["ngx", var], Some(value.as_bytes()));
    }
    for name in &outcome.remove_headers {
        let identity =
            Some(name) == cfg.key_id_header.as_ref() || Some(name) == cfg.owner_header.as_ref();
        // Blank it only when sent once: replacing a repeated header zeroes the later copies,
        // which nginx then forwards anyway (the config's proxy_set_header drops them all).
        let copies = headers.iter().filter(|(k, _)| *k == name.as_str()).count();
        if !identity && copies == 1 {
            let _ = hostcalls::set_map_value(
                proxy_wasm::types::MapType::HttpRequestHeaders,
                name,
                Some(""),
            );
        }
    }
    if let Some(path) = &outcome.new_path {
        let query = path.split_once('?').map_or("", |(_, q)| q);
        let _ = hostcalls::set_property(vec!["ngx", "args"], Some(query.as_bytes()));
    }
}
