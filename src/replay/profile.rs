//! Replay profiles: the flags of `loadtape replay` in a TOML file (`replay-profiles/*.toml`),
//! plus filters, so that a team keeps how it replays beside its tapes. A flag given on the
//! command line wins over the profile. Unknown keys are errors: a typo must not silently
//! replay something else.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use sha2::Digest;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    pub target: Option<String>,
    pub speed: Option<f64>,
    pub rate: Option<f64>,
    /// `FROM:TO:DURATION`, as `--ramp`.
    pub ramp: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub duration: Option<String>,
    pub limit: Option<u64>,
    #[serde(rename = "loop")]
    pub looped: Option<bool>,
    pub max_in_flight: Option<usize>,
    /// `preserve` or `pooled`.
    pub connections: Option<String>,
    /// `"Name: value"` lines, as `--header`.
    #[serde(default)]
    pub headers: Vec<String>,
    pub insecure: Option<bool>,
    pub ca: Option<PathBuf>,
    /// `1` or `2`: speak this HTTP version whatever the tape recorded.
    pub http: Option<u8>,
    pub timeout: Option<String>,
    pub lag_limit: Option<String>,
    #[serde(default)]
    pub filter: ProfileFilter,
    /// `[[auth]]`: fresh credentials per path prefix (see `replay::auth`).
    #[serde(default)]
    pub auth: Vec<super::auth::AuthRule>,
    /// `[[rewrite]]`: hosts and path prefixes of the recorded world mapped onto the test
    /// cluster's (see `replay::rewrite`).
    #[serde(default)]
    pub rewrite: Vec<super::rewrite::RewriteRule>,
    /// Recorded header fields not to send.
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// `[state]`: JSON fields to map, and what to do with unmappable requests (see
    /// `replay::state`).
    #[serde(default)]
    pub state: super::state::StateOptions,
    /// `[gate]`: the thresholds of `loadtape diff` (and `replay --gate`); see
    /// `report::verdict`.
    pub gate: Option<crate::report::verdict::Gate>,
    /// `[[endpoint]]`: endpoint classes for routes the built-in templates do not know.
    #[serde(default)]
    pub endpoint: Vec<crate::endpoint::EndpointRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFilter {
    /// Regular expressions on the path: only matching requests are replayed.
    #[serde(default)]
    pub include: Vec<String>,
    /// Regular expressions on the path: matching requests are not replayed.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only this fraction of the recorded connections (whole connections: flows stay intact).
    pub fraction: Option<f64>,
}

impl Profile {
    /// Reads a profile; also returns the sha256 of its bytes, for the results' provenance.
    pub fn load(path: &Path) -> anyhow::Result<(Profile, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the profile {}", path.display()))?;
        let profile: Profile = toml::from_str(&text)
            .with_context(|| format!("the profile {} is not valid", path.display()))?;
        let hash = crate::tape::hex(&sha2::Sha256::digest(text.as_bytes()));
        Ok((profile, hash))
    }
}
