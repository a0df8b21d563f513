//! Fresh credentials for a replay. Recorded ones were redacted (kind, length, fingerprint), so
//! the profile says, per path prefix, where fresh ones come from:
//!
//! * `basic` and `bearer`: a fixed account or token (Quay API v1 OAuth tokens);
//! * `jwt-hs256`: a JWT signed per request with a pre-shared key, as Quay signs its calls to
//!   Clair (issuer configurable, five minutes' lifetime);
//! * `registry-token`: the registry token flow. Recorded token requests (`/v2/auth`) are sent
//!   again with the configured account; the token each live answer carries replaces, in later
//!   requests, the redacted token whose fingerprint the recorded answer issued. A request that
//!   used that token waits for the token request's answer.
//!
//! A rule may also name the recorded credential it stands for, by the redaction fingerprint
//! `loadtape replay --dry-run` lists (`fingerprint = "a1e7efb4fd2322bd"`), or, for token
//! requests, by the `account=` they asked for: a tape with several users (or a wrong password,
//! recorded on purpose) replays each with its own fresh account. The most specific rule wins:
//! fingerprint, then account, then the longest prefix. Fingerprints hold within one recording
//! (one `loadtape record` process, or one imported HAR).
//!
//! A request that carries a registry token the tape never saw issued (its client logged in
//! before the recording began), or whose live token was refused, gets a token of its own after
//! the target's unexpected 401: from the live challenge's realm, whose path and query only are
//! sent, to the target. Such fetches are counted.
//!
//! Secrets never sit in the profile: it names environment variables that hold them.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine as _;
use http::header::HeaderValue;
use serde::Deserialize;

use super::state::Issued;

/// One `[[auth]]` entry of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthRule {
    /// Requests whose path starts with this get these credentials.
    pub path_prefix: String,
    /// `basic`, `bearer`, `jwt-hs256` or `registry-token`.
    pub kind: String,
    /// Environment variables holding the account (basic, registry-token).
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    /// Environment variable holding the token (bearer).
    pub token_env: Option<String>,
    /// Environment variable holding the pre-shared key, base64 as in Clair's config (jwt-hs256).
    pub key_env: Option<String>,
    /// The JWT's issuer (jwt-hs256), `quay` by default.
    pub issuer: Option<String>,
    /// Only requests whose recorded credential had this redaction fingerprint (16 hex digits).
    pub fingerprint: Option<String>,
    /// Only token requests that asked for this `account=` (registry-token).
    pub account: Option<String>,
}

/// A rule with its secrets read.
#[derive(Debug, Clone)]
pub enum Credential {
    Basic(HeaderValue),
    Bearer(HeaderValue),
    Jwt {
        key: Vec<u8>,
        issuer: String,
    },
    /// The account token requests are sent with.
    RegistryToken(HeaderValue),
}

/// A rule ready to match requests.
#[derive(Debug, Clone)]
pub struct Rule {
    pub prefix: String,
    pub fingerprint: Option<u64>,
    pub account: Option<String>,
    pub credential: Credential,
}

impl Rule {
    fn matches(&self, path: &str, recorded: Option<u64>, account: Option<&str>) -> bool {
        path.starts_with(self.prefix.as_str())
            && self.fingerprint.map_or(true, |f| Some(f) == recorded)
            && self.account.as_deref().map_or(true, |a| Some(a) == account)
    }

    /// How the dry run names it.
    pub fn describe(&self) -> String {
        let kind = match &self.credential {
            Credential::Basic(_) => "basic",
            Credential::Bearer(_) => "bearer",
            Credential::Jwt { .. } => "jwt-hs256",
            Credential::RegistryToken(_) => "registry-token",
        };
        let mut out = format!("{kind} rule for {:?}", self.prefix);
        if let Some(f) = self.fingerprint {
            out.push_str(&format!(" fingerprint {f:016x}"));
        }
        if let Some(a) = &self.account {
            out.push_str(&format!(" account {a:?}"));
        }
        out
    }
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    rules: Vec<Rule>,
}

fn env(name: &Option<String>, what: &str, rule: &AuthRule) -> anyhow::Result<String> {
    let Some(name) = name else {
        bail!(
            "the profile's auth for {:?} ({}) needs `{what}`: the name of an environment variable holding it",
            rule.path_prefix,
            rule.kind
        );
    };
    std::env::var(name).with_context(|| {
        format!(
            "the profile's auth for {:?} reads ${name}, which is not set",
            rule.path_prefix
        )
    })
}

impl Credential {
    /// A Basic `Authorization` value.
    pub fn basic(user: &str, password: &str) -> anyhow::Result<HeaderValue> {
        basic(user, password)
    }
}

fn basic(user: &str, password: &str) -> anyhow::Result<HeaderValue> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {b64}")).context("credentials do not make a header")
}

impl Auth {
    /// Rules made in code (the demo); the most specific first, as from a profile.
    pub fn new(mut rules: Vec<Rule>) -> Auth {
        rules.sort_by_key(|r| {
            std::cmp::Reverse((r.fingerprint.is_some(), r.account.is_some(), r.prefix.len()))
        });
        Auth { rules }
    }

    pub fn from_rules(rules: &[AuthRule]) -> anyhow::Result<Auth> {
        let mut out = Vec::new();
        for r in rules {
            let credential = match r.kind.as_str() {
                "basic" => Credential::Basic(basic(
                    &env(&r.username_env, "username-env", r)?,
                    &env(&r.password_env, "password-env", r)?,
                )?),
                "registry-token" => Credential::RegistryToken(basic(
                    &env(&r.username_env, "username-env", r)?,
                    &env(&r.password_env, "password-env", r)?,
                )?),
                "bearer" => Credential::Bearer(
                    HeaderValue::from_str(&format!(
                        "Bearer {}",
                        env(&r.token_env, "token-env", r)?
                    ))
                    .context("the token does not make a header")?,
                ),
                "jwt-hs256" => {
                    let raw = env(&r.key_env, "key-env", r)?;
                    let key = base64::engine::general_purpose::STANDARD
                        .decode(raw.trim())
                        .unwrap_or_else(|_| raw.trim().as_bytes().to_vec());
                    Credential::Jwt {
                        key,
                        issuer: r.issuer.clone().unwrap_or_else(|| "quay".into()),
                    }
                }
                other => bail!(
                    "the profile's auth kind {other:?} is unknown: write basic, bearer, jwt-hs256 or registry-token"
                ),
            };
            let fingerprint = match &r.fingerprint {
                Some(f) => Some(u64::from_str_radix(f.trim(), 16).ok().filter(|_| f.trim().len() == 16).with_context(|| {
                    format!(
                        "the profile's auth for {:?} has fingerprint {f:?}: write the 16 hex digits `loadtape replay --dry-run` lists",
                        r.path_prefix
                    )
                })?),
                None => None,
            };
            out.push(Rule {
                prefix: r.path_prefix.clone(),
                fingerprint,
                account: r.account.clone(),
                credential,
            });
        }
        Ok(Auth::new(out))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule (and its index) for a request to `path` whose recorded credential had the
    /// fingerprint `recorded`, asking for `account` (token requests).
    pub fn rule_for(
        &self,
        path: &str,
        recorded: Option<u64>,
        account: Option<&str>,
    ) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(path, recorded, account))
    }

    pub fn rule(&self, index: usize) -> &Rule {
        &self.rules[index]
    }

    /// The account for tokens fetched after an unexpected 401 on `path`: that of a
    /// registry-token rule for it, one not restricted to a recorded credential or account if
    /// there is one.
    pub fn token_account(&self, path: &str) -> Option<(usize, HeaderValue)> {
        let mut found = None;
        for (i, r) in self.rules.iter().enumerate() {
            if let (Credential::RegistryToken(account), true) =
                (&r.credential, path.starts_with(r.prefix.as_str()))
            {
                let general = r.fingerprint.is_none() && r.account.is_none();
                if general || found.is_none() {
                    found = Some((i, account.clone()));
                }
                if general {
                    break;
                }
            }
        }
        found
    }
}

/// An HS256 JWT for `issuer`, valid from now for five minutes.
pub fn sign_jwt(key: &[u8], issuer: &str) -> HeaderValue {
    use hmac::Mac;
    let now = chrono::Utc::now().timestamp();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(
        serde_json::json!({"iss": issuer, "iat": now, "nbf": now - 5, "exp": now + 300})
            .to_string(),
    );
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{header}.{claims}").as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    HeaderValue::from_str(&format!("Bearer {header}.{claims}.{signature}"))
        .expect("base64 is a valid header value")
}

/// Where a request's credential comes from: what `--dry-run` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthUse {
    /// The recording carried no credential.
    None,
    /// A rule's credential (its index).
    Rule(usize),
    /// A token request, sent with a rule's account.
    TokenRequest(usize),
    /// The live token that a token request on the tape gets.
    LiveToken,
    /// No token request on the tape issued the recorded token: one is fetched, with a rule's
    /// account, after the target answers 401.
    Fetched(usize),
    /// Redacted, and no rule gives a fresh one: the request goes without.
    Dropped,
}

/// A token fetched by the replay itself after an unexpected 401, shared by the requests that
/// carried the same recorded token (one fetch serves them all until the target refuses it).
#[derive(Debug)]
pub struct Fallback {
    /// The account token requests are sent with (Basic).
    pub account: HeaderValue,
    /// Whether a token was fetched: read first, so that the common case (none ever fetched)
    /// takes no lock on the send path.
    fetched: std::sync::atomic::AtomicBool,
    token: std::sync::Mutex<Option<HeaderValue>>,
}

impl Fallback {
    pub fn new(account: HeaderValue) -> Fallback {
        Fallback {
            account,
            fetched: std::sync::atomic::AtomicBool::new(false),
            token: std::sync::Mutex::new(None),
        }
    }

    /// The token fetched last, as an `Authorization` value.
    pub fn get(&self) -> Option<HeaderValue> {
        if !self.fetched.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.token.lock().ok()?.clone()
    }

    pub fn set(&self, token: &str) {
        if let (Ok(v), Ok(mut slot)) = (
            HeaderValue::from_str(&format!("Bearer {token}")),
            self.token.lock(),
        ) {
            *slot = Some(v);
            self.fetched
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The token request a `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge
/// asks for: the realm's path, with service and scope as its query. Only path and query are
/// used: the request goes to the target, never to the realm's host.
pub fn token_request_target(challenge: &str) -> Option<String> {
    let params = challenge.trim().strip_prefix("Bearer ")?;
    let (mut realm, mut query) = (None, Vec::new());
    for (key, value) in challenge_params(params) {
        match key.as_str() {
            "realm" => realm = super::state::location_path(&value),
            "service" | "scope" => query.push(format!("{key}={}", crate::percent::encode(&value))),
            _ => {}
        }
    }
    let mut target = realm?;
    if !query.is_empty() {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(&query.join("&"));
    }
    Some(target)
}

/// `key="value"` pairs of a challenge, commas inside quotes kept.
pub fn challenge_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            },
        };
        out.push((key, value.to_string()));
        rest = next;
    }
    out
}

/// Live tokens of the registry token flow, by the fingerprint of the recorded token they stand
/// for.
#[derive(Default)]
pub struct Tokens {
    map: HashMap<u64, Arc<Issued>>,
}

impl Tokens {
    pub fn insert(&mut self, fingerprint: u64, issued: Arc<Issued>) {
        if self.map.len() >= 16_384 {
            self.map.retain(|_, i| !i.done.is_set());
        }
        self.map.insert(fingerprint, issued);
    }

    pub fn get(&self, fingerprint: u64) -> Option<Arc<Issued>> {
        self.map.get(&fingerprint).cloned()
    }
}

/// The token in a token endpoint's JSON answer (`token` or `access_token`).
pub fn token_in(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("token")
        .or_else(|| v.get("access_token"))?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_verify_under_their_key() {
        use hmac::Mac;
        let v = sign_jwt(b"psk", "quay");
        let token = v.to_str().unwrap().strip_prefix("Bearer ").unwrap();
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"psk").unwrap();
        mac.update(signed.as_bytes());
        let expected =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(signature, expected);
        let claims = crate::redact::read_jwt(token).unwrap();
        assert_eq!(claims.issuer.as_deref(), Some("quay"));
    }

    #[test]
    fn a_challenge_names_the_token_request_on_the_target() {
        let c = r#"Bearer realm="https://quay.example:8443/v2/auth",service="quay.example",scope="repository:org/app:pull,push""#;
        assert_eq!(
            token_request_target(c).unwrap(),
            "/v2/auth?service=quay.example&scope=repository%3Aorg%2Fapp%3Apull%2Cpush"
        );
        assert_eq!(token_request_target(r#"Basic realm="registry""#), None);
    }

    #[test]
    fn the_most_specific_rule_wins() {
        std::env::set_var("LOADTAPE_TEST_AUTH_USER", "u");
        std::env::set_var("LOADTAPE_TEST_AUTH_PASS", "p");
        let rule = |fingerprint: Option<&str>, account: Option<&str>, prefix: &str| AuthRule {
            path_prefix: prefix.into(),
            kind: "registry-token".into(),
            username_env: Some("LOADTAPE_TEST_AUTH_USER".into()),
            password_env: Some("LOADTAPE_TEST_AUTH_PASS".into()),
            token_env: None,
            key_env: None,
            issuer: None,
            fingerprint: fingerprint.map(str::to_string),
            account: account.map(str::to_string),
        };
        let auth = Auth::from_rules(&[
            rule(None, None, "/v2/"),
            rule(None, Some("bob"), "/v2/"),
            rule(Some("63374933ec1bd47b"), None, "/v2/"),
        ])
        .unwrap();
        let pick = |fp, account| auth.rule_for("/v2/auth", fp, account).unwrap().1;
        assert_eq!(
            pick(Some(0x63374933ec1bd47b), Some("bob")).fingerprint,
            Some(0x63374933ec1bd47b)
        );
        assert_eq!(pick(Some(1), Some("bob")).account.as_deref(), Some("bob"));
        assert!(pick(Some(1), Some("alice")).account.is_none());
        // Fetches after a 401 take the general rule's account.
        let (i, _) = auth.token_account("/v2/org/app/manifests/v1").unwrap();
        assert!(auth.rule(i).fingerprint.is_none() && auth.rule(i).account.is_none());
        let bad = Auth::from_rules(&[rule(Some("xyz"), None, "/")]).unwrap_err();
        assert!(format!("{bad:#}").contains("16 hex digits"));
    }

    #[test]
    fn tokens_are_read_from_either_field() {
        assert_eq!(token_in(br#"{"token": "abc"}"#).unwrap(), "abc");
        assert_eq!(
            token_in(br#"{"access_token": "xyz", "expires_in": 60}"#).unwrap(),
            "xyz"
        );
        assert_eq!(token_in(b"not json"), None);
    }
}
