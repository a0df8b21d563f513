//! What a run would do: `--dry-run`'s output, drained from the plan without sending.

use super::*;

/// What a run would do: `--dry-run`'s output.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanSummary {
    pub target: String,
    pub requests: u64,
    /// Requests per endpoint class.
    pub endpoints: BTreeMap<String, u64>,
    /// Requests that change state (not GET, HEAD, OPTIONS).
    pub writes: u64,
    /// Requests changed from the recording (`--header`).
    pub rewritten: u64,
    /// Requests whose body is generated (not stored on the tape).
    pub synthesised: u64,
    /// Requests that go to an upload location the live target will issue (stateful replay).
    pub live_locations: u64,
    /// Requests whose answer issues such a location.
    pub issuing: u64,
    /// Recorded digests replaced by those of the bytes the replay sends.
    pub digests_remapped: u64,
    /// Redacted credentials by kind: a replay sends these requests without them.
    pub auth: BTreeMap<String, u64>,
    /// Where requests' credentials come from (rules, token requests, live tokens, fetches),
    /// and which recorded ones get none.
    pub auth_sources: BTreeMap<String, u64>,
    /// Requests carrying values of the profile's JSON fields that live answers will give.
    pub json_mapped: u64,
    /// Requests known unmappable now (an upload session opened before the tape began, and
    /// the requests that continue it).
    pub unmapped: u64,
    /// Live connections opened for recorded ones (preserve mode).
    pub connections: u64,
    /// Seconds from the first to the last intended instant.
    pub duration_s: f64,
    /// The most requests intended within one second.
    pub peak_rate: u64,
    pub counters: PlanCounters,
}

impl Plan {
    /// Drains the plan without sending anything.
    pub fn summarise(mut self, target: String) -> Result<PlanSummary, TapeError> {
        let mut s = PlanSummary {
            target,
            ..PlanSummary::default()
        };
        let (mut second, mut in_second) = (u64::MAX, 0u64);
        let mut conns = std::collections::HashSet::new();
        let mut first = None;
        while let Some(step) = self.next_step()? {
            let Step::Send(p) = step else { continue };
            s.requests += 1;
            first.get_or_insert(p.at);
            s.duration_s = (p.at - first.unwrap_or(0)) as f64 / 1e9;
            *s.endpoints.entry(p.endpoint.clone()).or_default() += 1;
            if !matches!(p.method, Method::Get | Method::Head | Method::Options) {
                s.writes += 1;
            }
            use crate::tape::replayed_flags::{REWRITTEN, SYNTHESISED};
            s.rewritten += u64::from(p.flags & REWRITTEN != 0);
            s.synthesised += u64::from(p.flags & SYNTHESISED != 0);
            s.live_locations += u64::from(p.live_target.is_some());
            s.issuing += u64::from(p.issues.is_some());
            for kind in &p.request.dropped_credentials {
                *s.auth.entry(kind.clone()).or_default() += 1;
            }
            if let Some(source) = self.describe_auth(&p) {
                *s.auth_sources.entry(source).or_default() += 1;
            }
            s.json_mapped += u64::from(!p.live_values.is_empty());
            s.unmapped += u64::from(p.flags & crate::tape::replayed_flags::UNMAPPED != 0);
            if self.options.connections == ConnectionMode::Preserve {
                conns.insert(p.conn);
            }
            let sec = p.at / 1_000_000_000;
            if sec == second {
                in_second += 1;
            } else {
                second = sec;
                in_second = 1;
            }
            s.peak_rate = s.peak_rate.max(in_second);
        }
        s.connections = conns.len() as u64;
        s.digests_remapped = self.digests.len() as u64;
        s.counters = self.counters.clone();
        Ok(s)
    }
}

impl Plan {
    /// Where a planned request's credential comes from, as the dry run lists it.
    fn describe_auth(&self, p: &Planned) -> Option<String> {
        let recorded = p
            .recorded_credential
            .map(|(kind, fp)| format!("recorded {} {fp:016x}", kind.as_str()));
        let rule = |i: usize| self.template.auth.rule(i).describe();
        Some(match p.auth_use {
            AuthUse::None => return None,
            AuthUse::Rule(i) => format!(
                "{} (replaces recorded {})",
                rule(i),
                p.recorded_credential.map_or("?", |(k, _)| k.as_str())
            ),
            AuthUse::TokenRequest(i) => format!(
                "token request with the account of the {}, for {}{}",
                rule(i),
                recorded.unwrap_or_default(),
                query_value(p.request.path.as_str(), "account")
                    .map(|a| format!(" (account={a})"))
                    .unwrap_or_default()
            ),
            AuthUse::LiveToken => "live token from a token request on the tape".to_string(),
            AuthUse::Fetched(i) => format!(
                "token fetched after the target's 401 with the account of the {}: {} was issued before the tape began",
                rule(i),
                recorded.unwrap_or_default()
            ),
            AuthUse::Dropped => format!(
                "NONE: {} has no [[auth]] rule, sent without",
                recorded.unwrap_or_default()
            ),
        })
    }
}

impl PlanSummary {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = &self.counters;
        let _ = writeln!(out, "dry run: nothing is sent");
        let _ = writeln!(out, "target:      {}", self.target);
        let _ = writeln!(
            out,
            "requests:    {} planned over {:.1} s, peak {} per second; {} writes",
            self.requests, self.duration_s, self.peak_rate, self.writes
        );
        if self.connections > 0 {
            let _ = writeln!(
                out,
                "connections: {} (one per recorded connection)",
                self.connections
            );
        }
        let _ = writeln!(
            out,
            "left out:    {} filtered, {} upgrades (WebSocket), {} unmappable, {} for other shards",
            c.filtered, c.upgrades, c.unmappable, c.other_shards
        );
        let _ = writeln!(
            out,
            "rewritten:   {} (credentials, headers, hosts or paths changed by flags or the profile)",
            self.rewritten
        );
        let _ = writeln!(
            out,
            "synthesised: {} bodies not stored on the tape, generated with their recorded length; {} recorded digests follow the bytes sent",
            self.synthesised, self.digests_remapped
        );
        let _ = writeln!(
            out,
            "mapped:      {} requests go to upload locations that {} live answers will issue",
            self.live_locations, self.issuing
        );
        if self.auth.is_empty() {
            let _ = writeln!(out, "auth:        no redacted credentials in the requests");
        } else {
            let kinds: Vec<String> = self.auth.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = writeln!(
                out,
                "auth:        recorded credentials were redacted ({}); these requests go without them unless --header sets one",
                kinds.join(", ")
            );
        }
        if self.json_mapped > 0 || self.unmapped > 0 {
            let _ = writeln!(
                out,
                "values:      {} requests carry values of the profile's JSON fields that live answers will give; {} cannot be mapped (sessions opened before the tape began)",
                self.json_mapped, self.unmapped
            );
        }
        if !self.auth_sources.is_empty() {
            let _ = writeln!(out, "credentials:");
            for (source, n) in &self.auth_sources {
                let _ = writeln!(out, "  {n:>8}  {source}");
            }
        }
        let _ = writeln!(out, "endpoints:");
        let mut v: Vec<_> = self.endpoints.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (k, n) in v {
            let _ = writeln!(out, "  {n:>8}  {k}");
        }
        out
    }
}
