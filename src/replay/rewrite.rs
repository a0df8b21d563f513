//! Profile rewrites: what differs between the recorded world and the test cluster's, other
//! than values the live target issues (`state.rs`).
//!
//! * `[[rewrite]] from = "http://127.0.0.1:15690/" to = "http://registry.test:5000/"`: a literal
//!   replaced in targets, header values and text bodies. A Clair `index_report` request names
//!   the layers' URLs in its body (where Quay put presigned storage URLs): the test cluster's
//!   Clair must fetch them from the test cluster's registry, not from production's.
//! * `[[rewrite]] path-prefix = "/quay/v2/" to = "/v2/"`: a target's start (a test cluster
//!   that mounts the service elsewhere).
//! * `remove-headers = ["x-request-id"]`: fields the recording has that must not go out.
//!
//! All of it is decided on the plan's thread, once per request.

use std::borrow::Cow;

use anyhow::bail;
use http::header::HeaderName;
use serde::Deserialize;

/// One `[[rewrite]]` of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RewriteRule {
    /// A literal replaced wherever it appears (targets, header values, text bodies).
    pub from: Option<String>,
    /// A target prefix replaced at the start of targets only.
    pub path_prefix: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone, Default)]
pub struct Rewrites {
    literals: Vec<(String, String)>,
    prefixes: Vec<(String, String)>,
    pub remove_headers: Vec<HeaderName>,
}

impl Rewrites {
    pub fn new(rules: &[RewriteRule], remove: &[String]) -> anyhow::Result<Rewrites> {
        let mut out = Rewrites::default();
        for r in rules {
            match (&r.from, &r.path_prefix) {
                (Some(from), None) if !from.is_empty() => {
                    out.literals.push((from.clone(), r.to.clone()))
                }
                (None, Some(prefix)) if prefix.starts_with('/') => {
                    out.prefixes.push((prefix.clone(), r.to.clone()))
                }
                _ => bail!(
                    "a [[rewrite]] takes either `from = \"...\"` (a literal, e.g. a host's URL) or `path-prefix = \"/...\"`, and `to`; this one has from = {:?}, path-prefix = {:?}",
                    r.from,
                    r.path_prefix
                ),
            }
        }
        // The longest prefix first.
        out.prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for name in remove {
            match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(n) => out.remove_headers.push(n),
                Err(_) => bail!("remove-headers: {name:?} is not a header name"),
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.literals.is_empty() && self.prefixes.is_empty() && self.remove_headers.is_empty()
    }

    /// A target with its prefix and literals replaced; `None` when nothing changed.
    pub fn target(&self, target: &str) -> Option<String> {
        let mut out = Cow::Borrowed(target);
        if let Some((from, to)) = self
            .prefixes
            .iter()
            .find(|(from, _)| target.starts_with(from.as_str()))
        {
            out = Cow::Owned(format!("{to}{}", &target[from.len()..]));
        }
        if let Some(replaced) = self.text(&out) {
            out = Cow::Owned(replaced);
        }
        match out {
            Cow::Owned(s) => Some(s),
            Cow::Borrowed(_) => None,
        }
    }

    /// `text` with every literal replaced; `None` when none appears.
    pub fn text(&self, text: &str) -> Option<String> {
        let mut out: Option<String> = None;
        for (from, to) in &self.literals {
            let current = out.as_deref().unwrap_or(text);
            if current.contains(from.as_str()) {
                out = Some(current.replace(from.as_str(), to));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: Option<&str>, prefix: Option<&str>, to: &str) -> RewriteRule {
        RewriteRule {
            from: from.map(str::to_string),
            path_prefix: prefix.map(str::to_string),
            to: to.into(),
        }
    }

    #[test]
    fn literals_and_prefixes_rewrite_targets_and_bodies() {
        let r = Rewrites::new(
            &[
                rule(
                    Some("http://127.0.0.1:15690/"),
                    None,
                    "http://registry-b:5000/",
                ),
                rule(None, Some("/quay/"), "/"),
                rule(None, Some("/quay/v2/"), "/registry/v2/"),
            ],
            &["X-Request-Id".into()],
        )
        .unwrap();
        assert_eq!(r.target("/quay/v2/x").unwrap(), "/registry/v2/x");
        assert_eq!(r.target("/quay/api").unwrap(), "/api");
        assert_eq!(r.target("/v2/x"), None);
        let body = r#"{"uri": "http://127.0.0.1:15690/v2/a/blobs/sha256:00"}"#;
        assert_eq!(
            r.text(body).unwrap(),
            r#"{"uri": "http://registry-b:5000/v2/a/blobs/sha256:00"}"#
        );
        assert_eq!(r.text("nothing here"), None);
        assert_eq!(r.remove_headers[0].as_str(), "x-request-id");
        let bad = Rewrites::new(&[rule(None, Some("quay"), "/")], &[]).unwrap_err();
        assert!(bad.to_string().contains("path-prefix = \"/...\""));
    }
}
