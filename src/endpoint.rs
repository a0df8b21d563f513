//! Endpoint classes: which route of the service a request hit.
//!
//! Latency only compares like with like: a blob GET of a 500 MiB layer and a `/v2/` ping must not
//! share a histogram. Every exchange is therefore mapped to a template such as
//! `GET /v2/{repo}/blobs/{digest}`. Registry v2, Quay API v1 and Clair v4 routes are known;
//! other paths are templated segment by segment, recognising digests, UUIDs, hex ids and numbers.

/// A profile's `[[endpoint]]`: requests whose path matches `path` (a regular expression) and
/// whose method is `method` (any when absent) make the class `class`. For routes the built-in
/// rules do not know, or classes a team wants split or joined.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRule {
    pub method: Option<String>,
    pub path: String,
    pub class: String,
}

/// Profile rules first, then the built-in templates.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    rules: Vec<(Option<String>, regex::Regex, String)>,
}

impl Classifier {
    pub fn new(rules: &[EndpointRule]) -> Result<Classifier, String> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let pattern = regex::Regex::new(&r.path).map_err(|e| {
                format!(
                    "[[endpoint]] path {:?} is not a regular expression: {e}",
                    r.path
                )
            })?;
            out.push((
                r.method.as_ref().map(|m| m.to_ascii_uppercase()),
                pattern,
                r.class.clone(),
            ));
        }
        Ok(Classifier { rules: out })
    }

    pub fn classify(&self, method: &str, target: &str) -> String {
        if !self.rules.is_empty() {
            let path = target.split(['?', '#']).next().unwrap_or("");
            for (m, pattern, class) in &self.rules {
                if m.as_deref().map_or(true, |m| m == method) && pattern.is_match(path) {
                    return class.clone();
                }
            }
        }
        template(method, target)
    }
}

/// The endpoint class of a request: method and templated path (query dropped).
pub fn template(method: &str, target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(path.len() + method.len() + 1);
    out.push_str(method);
    out.push(' ');
    out.push_str(&template_path(path));
    out
}

/// The templated path alone.
pub fn template_path(path: &str) -> String {
    let trailing = path.len() > 1 && path.ends_with('/');
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let templated = match segs.first() {
        Some(&"v2") => registry(&segs[1..]),
        Some(&"api") if segs.get(1) == Some(&"v1") => quay_api(&segs[2..]),
        _ => None,
    };
    let mut out = String::from("/");
    match templated {
        Some(t) => out.push_str(&t.join("/")),
        None => out.push_str(
            &segs
                .iter()
                .map(|s| generic(s))
                .collect::<Vec<_>>()
                .join("/"),
        ),
    }
    if trailing && out.len() > 1 {
        out.push('/');
    }
    out
}

/// Registry v2 (OCI distribution): repository names may hold slashes, so routes are found from
/// the end of the path.
fn registry(segs: &[&str]) -> Option<Vec<String>> {
    let mut t = vec!["v2".to_string()];
    let n = segs.len();
    let tail = |k: usize| segs.get(n.wrapping_sub(k)).copied();
    let name_ok = |end: usize| end >= 1;
    match (tail(3), tail(2), tail(1)) {
        _ if n == 0 => {}
        (_, _, Some(s)) if n == 1 && (s == "auth" || s == "_catalog" || s == "token") => {
            t.push(s.to_string())
        }
        (_, Some("manifests"), Some(r)) if name_ok(n - 2) => {
            t.extend(["{repo}".into(), "manifests".into()]);
            t.push(if is_digest(r) {
                "{digest}".into()
            } else {
                "{tag}".into()
            });
        }
        (Some("blobs"), Some("uploads"), Some(_)) if name_ok(n - 3) => {
            t.extend([
                "{repo}".into(),
                "blobs".into(),
                "uploads".into(),
                "{uuid}".into(),
            ]);
        }
        (_, Some("blobs"), Some("uploads")) if name_ok(n - 2) => {
            t.extend(["{repo}".into(), "blobs".into(), "uploads".into()]);
        }
        (_, Some("blobs"), Some(_)) if name_ok(n - 2) => {
            t.extend(["{repo}".into(), "blobs".into(), "{digest}".into()]);
        }
        (_, Some("tags"), Some("list")) if name_ok(n - 2) => {
            t.extend(["{repo}".into(), "tags".into(), "list".into()]);
        }
        (_, Some("referrers"), Some(_)) if name_ok(n - 2) => {
            t.extend(["{repo}".into(), "referrers".into(), "{digest}".into()]);
        }
        _ => return None,
    }
    Some(t)
}

/// Quay API v1: namespaces, repositories, users and teams by position.
fn quay_api(segs: &[&str]) -> Option<Vec<String>> {
    let mut t: Vec<String> = vec!["api".into(), "v1".into()];
    let mut rest = segs;
    let placeholders: &[&str] = match rest.first().copied() {
        Some("repository") if rest.len() >= 3 => &["{namespace}", "{repo}"],
        Some("organization") if rest.len() >= 2 => &["{org}"],
        Some("users") if rest.len() >= 2 => &["{user}"],
        _ => &[],
    };
    if let Some(first) = rest.first() {
        t.push(first.to_string());
        rest = &rest[1..];
    }
    for p in placeholders {
        t.push(p.to_string());
        rest = &rest[1..];
    }
    let mut i = 0;
    while i < rest.len() {
        let seg = rest[i];
        t.push(generic(seg));
        let named = match seg {
            "user" | "members" | "users" => Some("{user}"),
            "team" => Some("{team}"),
            "tag" => Some("{tag}"),
            "robots" => Some("{robot}"),
            "manifest" => Some("{digest}"),
            "build" => Some("{build}"),
            _ => None,
        };
        if let (Some(name), Some(_)) = (named, rest.get(i + 1)) {
            t.push(name.to_string());
            i += 1;
        }
        i += 1;
    }
    Some(t)
}

/// One path segment, with ids replaced by their kind.
fn generic(seg: &str) -> String {
    if is_digest(seg) {
        "{digest}".into()
    } else if is_uuid(seg) {
        "{uuid}".into()
    } else if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
        "{n}".into()
    } else if seg.len() >= 16 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
        "{id}".into()
    } else if seg.len() >= 32 && seg.bytes().any(|b| b.is_ascii_digit()) && !seg.contains('.') {
        "{token}".into()
    } else {
        seg.to_string()
    }
}

/// `algorithm:hex`, as OCI digests are written.
pub fn is_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some((alg, hex)) => {
            !alg.is_empty()
                && alg.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'+' || b == b'.' || b == b'_' || b == b'-'
                })
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::template;

    const D: &str = "sha256:c8e4875d88954010f5dba59d4e0e878bf5f1622d50f91b9c7631d427ecdb6e47";

    #[test]
    fn registry_routes() {
        let cases = [
            ("GET", "/v2/".to_string(), "GET /v2/"),
            (
                "GET",
                "/v2/auth?service=x&scope=repository:a/b:pull".into(),
                "GET /v2/auth",
            ),
            (
                "HEAD",
                format!("/v2/loadorg/web/blobs/{D}"),
                "HEAD /v2/{repo}/blobs/{digest}",
            ),
            (
                "GET",
                format!("/v2/org/team/app/manifests/{D}"),
                "GET /v2/{repo}/manifests/{digest}",
            ),
            (
                "PUT",
                "/v2/loadorg/web/manifests/latest".into(),
                "PUT /v2/{repo}/manifests/{tag}",
            ),
            (
                "POST",
                "/v2/loadorg/web/blobs/uploads/".into(),
                "POST /v2/{repo}/blobs/uploads/",
            ),
            (
                "PATCH",
                "/v2/loadorg/web/blobs/uploads/0b6b1e2e-5d1c-4b8a-9c1e-4f7d2a9e8b11?_state=abc"
                    .into(),
                "PATCH /v2/{repo}/blobs/uploads/{uuid}",
            ),
            (
                "GET",
                "/v2/a/tags/list?n=10".into(),
                "GET /v2/{repo}/tags/list",
            ),
            ("GET", "/v2/_catalog".into(), "GET /v2/_catalog"),
        ];
        for (m, p, want) in cases {
            assert_eq!(template(m, &p), want, "{m} {p}");
        }
    }

    #[test]
    fn quay_api_routes() {
        let cases = [
            ("GET", "/api/v1/user/", "GET /api/v1/user/"),
            (
                "GET",
                "/api/v1/repository?namespace=loadorg",
                "GET /api/v1/repository",
            ),
            (
                "GET",
                "/api/v1/repository/loadorg/web/tag/",
                "GET /api/v1/repository/{namespace}/{repo}/tag/",
            ),
            (
                "PUT",
                "/api/v1/repository/loadorg/web/permissions/user/reader",
                "PUT /api/v1/repository/{namespace}/{repo}/permissions/user/{user}",
            ),
            (
                "PUT",
                "/api/v1/organization/loadorg/team/owners/members/alice",
                "PUT /api/v1/organization/{org}/team/{team}/members/{user}",
            ),
            (
                "GET",
                "/api/v1/repository/loadorg/web",
                "GET /api/v1/repository/{namespace}/{repo}",
            ),
        ];
        for (m, p, want) in cases {
            assert_eq!(template(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn clair_and_generic_routes() {
        assert_eq!(
            template("GET", &format!("/matcher/api/v1/vulnerability_report/{D}")),
            "GET /matcher/api/v1/vulnerability_report/{digest}"
        );
        assert_eq!(
            template("POST", "/indexer/api/v1/index_report"),
            "POST /indexer/api/v1/index_report"
        );
        assert_eq!(
            template("GET", "/indexer/api/v1/index_state"),
            "GET /indexer/api/v1/index_state"
        );
        assert_eq!(
            template("GET", "/things/42/0123456789abcdef0123"),
            "GET /things/{n}/{id}"
        );
        assert_eq!(template("GET", "/"), "GET /");
    }
}
