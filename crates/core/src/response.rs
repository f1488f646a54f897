//! Refusal classes (SPEC §4): default status and body of each, operator overrides, and the body
//! template that carries the rate-limit context.

use std::fmt;

/// Every refusal is exactly one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    MissingKey,
    InvalidKey,
    ExpiredKey,
    Forbidden,
    IpDenied,
    RateLimited,
    Unavailable,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::MissingKey,
        Class::InvalidKey,
        Class::ExpiredKey,
        Class::Forbidden,
        Class::IpDenied,
        Class::RateLimited,
        Class::Unavailable,
    ];

    /// The name used in configuration (`errors.<name>`), default bodies and metric names.
    pub fn name(self) -> &'static str {
        match self {
            Class::MissingKey => "missing_key",
            Class::InvalidKey => "invalid_key",
            Class::ExpiredKey => "expired_key",
            Class::Forbidden => "forbidden",
            Class::IpDenied => "ip_denied",
            Class::RateLimited => "rate_limited",
            Class::Unavailable => "unavailable",
        }
    }

    pub fn from_name(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == name)
    }

    pub fn default_status(self) -> u32 {
        match self {
            Class::MissingKey | Class::InvalidKey | Class::ExpiredKey => 401,
            Class::Forbidden | Class::IpDenied => 403,
            Class::RateLimited => 429,
            Class::Unavailable => 503,
        }
    }

    pub fn default_body(self) -> &'static str {
        match self {
            Class::MissingKey => {
                r#"{"error":{"code":"missing_key","message":"API key is required"}}"#
            }
            Class::InvalidKey => r#"{"error":{"code":"invalid_key","message":"Invalid API key"}}"#,
            Class::ExpiredKey => {
                r#"{"error":{"code":"expired_key","message":"API key expired or revoked"}}"#
            }
            Class::Forbidden => {
                r#"{"error":{"code":"forbidden","message":"API key has no access to this resource"}}"#
            }
            Class::IpDenied => {
                r#"{"error":{"code":"ip_denied","message":"Client IP address not allowed"}}"#
            }
            Class::RateLimited => {
                r#"{"error":{"code":"rate_limited","message":"Rate limit exceeded","retry_after":{retry_after}}}"#
            }
            Class::Unavailable => {
                r#"{"error":{"code":"unavailable","message":"API key list not loaded"}}"#
            }
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The values a body template may substitute; all 0 where the refusal has no rate-limit context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateContext {
    pub retry_after: u64,
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
}

/// How one class answers: the SPEC's default, or the operator's override merged over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: u32,
    pub body: String,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

/// One `ErrorResponse` per class (SPEC §4), each the default until `errors.<class>` overrides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Responses([ErrorResponse; 7]);

impl Default for Responses {
    fn default() -> Self {
        Responses(Class::ALL.map(ErrorResponse::default_for))
    }
}

impl Responses {
    /// How `class` answers.
    pub fn get(&self, class: Class) -> &ErrorResponse {
        let [missing, invalid, expired, forbidden, ip, limited, unavailable] = &self.0;
        match class {
            Class::MissingKey => missing,
            Class::InvalidKey => invalid,
            Class::ExpiredKey => expired,
            Class::Forbidden => forbidden,
            Class::IpDenied => ip,
            Class::RateLimited => limited,
            Class::Unavailable => unavailable,
        }
    }

    /// How `class` answers, to merge an override into.
    pub fn get_mut(&mut self, class: Class) -> &mut ErrorResponse {
        let [missing, invalid, expired, forbidden, ip, limited, unavailable] = &mut self.0;
        match class {
            Class::MissingKey => missing,
            Class::InvalidKey => invalid,
            Class::ExpiredKey => expired,
            Class::Forbidden => forbidden,
            Class::IpDenied => ip,
            Class::RateLimited => limited,
            Class::Unavailable => unavailable,
        }
    }
}

impl ErrorResponse {
    pub fn default_for(class: Class) -> ErrorResponse {
        ErrorResponse {
            status: class.default_status(),
            body: class.default_body().to_string(),
            content_type: "application/json".to_string(),
            headers: Vec::new(),
        }
    }

    /// The body with `{retry_after}`, `{limit}`, `{remaining}` and `{reset}` substituted. Other
    /// braces are left alone, since JSON bodies are full of them.
    pub fn render_body(&self, ctx: &RateContext) -> String {
        render_template(&self.body, ctx)
    }
}

pub fn render_template(template: &str, ctx: &RateContext) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let value = [
            ("{retry_after}", ctx.retry_after),
            ("{limit}", ctx.limit),
            ("{remaining}", ctx.remaining),
            ("{reset}", ctx.reset),
        ]
        .into_iter()
        .find(|(token, _)| tail.starts_with(token));
        match value {
            Some((token, v)) => {
                out.push_str(&v.to_string());
                rest = &tail[token.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Class::ALL {
            assert_eq!(Class::from_name(c.name()), Some(c));
        }
        assert_eq!(Class::from_name("nope"), None);
    }

    #[test]
    fn default_bodies_are_json_with_their_code() {
        for c in Class::ALL {
            let body = ErrorResponse::default_for(c).render_body(&RateContext {
                retry_after: 7,
                ..Default::default()
            });
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], c.name());
        }
    }

    #[test]
    fn template_substitutes_only_known_tokens() {
        let ctx = RateContext {
            retry_after: 12,
            limit: 60,
            remaining: 0,
            reset: 1708345200,
        };
        assert_eq!(
            render_template(
                r#"{"a":{retry_after},"b":"{limit}/{remaining}@{reset}","c":{x}}"#,
                &ctx
            ),
            r#"{"a":12,"b":"60/0@1708345200","c":{x}}"#
        );
        assert_eq!(render_template("{{retry_after}}", &ctx), "{12}");
        assert_eq!(render_template("plain", &ctx), "plain");
        assert_eq!(render_template("{", &ctx), "{");
    }
}
