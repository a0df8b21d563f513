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

#[derive(Debug, Clone, Default)]
pub struct Auth {
    rules: Vec<(String, Credential)>,
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

fn basic(user: &str, password: &str) -> anyhow::Result<HeaderValue> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {b64}")).context("credentials do not make a header")
}

impl Auth {
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
            out.push((r.path_prefix.clone(), credential));
        }
        // Longest prefix first.
        out.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Ok(Auth { rules: out })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The credential for a request to `path`.
    pub fn for_path(&self, path: &str) -> Option<&Credential> {
        self.rules
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, c)| c)
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
    fn tokens_are_read_from_either_field() {
        assert_eq!(token_in(br#"{"token": "abc"}"#).unwrap(), "abc");
        assert_eq!(
            token_in(br#"{"access_token": "xyz", "expires_in": 60}"#).unwrap(),
            "xyz"
        );
        assert_eq!(token_in(b"not json"), None);
    }
}
