//! Planning one recorded exchange: the request made sendable, what it waits for (writes to
//! its resource, the answers whose live values it carries), where its credential comes from,
//! and what live values its own answer will give (see `state.rs` and `auth.rs`).

use super::*;

impl Plan {
    pub(super) fn plan_exchange(
        &mut self,
        source: usize,
        e: &Exchange,
        at: Nanos,
    ) -> Option<Planned> {
        let (mut request, mut flags, dropped) = prepare(e, &self.template, &self.blobs)?;
        let (after, mut done) = self.causality(e);
        let mut after: Vec<Arc<Done>> = after.into_iter().collect();

        // Credentials: fresh ones where the profile gives them.
        let (auth_use, auth_token, issues_token, fallback) =
            self.credentials(e, &mut request, &mut after, &mut done);
        let recorded_credential = request
            .authorization
            .take()
            .map(|r| (r.kind, r.fingerprint));
        if !matches!(auth_use, AuthUse::None | AuthUse::Dropped) {
            flags |= replayed_flags::REWRITTEN;
            request.dropped_credentials.clear();
        } else if dropped {
            self.counters.credentials_dropped += 1;
        }

        // Digests: an upload's bytes are hashed as they will be sent, and every digest the
        // replay changed is followed, in JSON bodies (a manifest's own digest then changes
        // too) and in the target.
        let path = e.request.path();
        if is_upload(path) {
            let completion = done.clone().map(|d| (d, e.timing.end()));
            self.digests
                .upload(path, &e.request.target, &request.body, completion);
        }
        // A request naming a digest uploaded earlier on the tape waits for that upload.
        after.extend(self.digests.depends(&e.request.target, e.timing.start));
        if let Some(text) = e
            .request
            .body
            .whole_inline()
            .filter(|_| !is_upload(path))
            .and_then(|b| std::str::from_utf8(b).ok())
        {
            after.extend(self.digests.depends(text, e.timing.start));
        }
        // A write creates or changes the resource its target or its answer's `Location` names
        // by digest (a manifest, a Clair index report): later requests naming it wait for it.
        if let (Some(d), false) = (&done, is_upload(path)) {
            self.digests.wrote(&e.request.target, d, e.timing.end());
            if let Some(location) = e
                .response
                .as_ref()
                .ok()
                .and_then(|r| r.headers.get_str("location"))
            {
                self.digests.wrote(location, d, e.timing.end());
            }
        }
        if let (BodySource::Bytes(bytes), false) = (&request.body, is_upload(path)) {
            // (A blob's bytes are opaque: only manifests and JSON requests are rewritten, by
            // the profile's literals, then by the digests the replay changed.)
            let rewritten = std::str::from_utf8(bytes).ok().and_then(|text| {
                let literal = self.template.rewrites.text(text);
                let base = literal.as_deref().unwrap_or(text);
                self.digests.rewrite(base).or(literal)
            });
            if let Some(text) = rewritten {
                let new = Bytes::from(text);
                if let Some(recorded) = e.request.body.sha256 {
                    self.digests.insert(recorded, Sha256::digest(&new).into());
                }
                request
                    .headers
                    .insert(http::header::CONTENT_LENGTH, new.len().into());
                request.body = BodySource::Bytes(new);
                flags |= replayed_flags::REWRITTEN;
            }
        }
        if let Some(target) = self.digests.rewrite(request.path.as_str()) {
            request.path = http::uri::PathAndQuery::try_from(target).ok()?;
            flags |= replayed_flags::REWRITTEN;
        }

        // Locations: a request to one a recorded answer gave waits for the live answer.
        let live_target = self.locations.find(request.path.as_str());
        let unmappable = match &live_target {
            Some(t) => {
                after.push(t.issued.done.clone());
                flags |= replayed_flags::REWRITTEN;
                // The request that opened or moved the session could not be mapped either.
                t.issued.doomed()
            }
            // The session was opened before the tape began: no live answer will name it.
            None => is_upload_session(request.path.path()),
        };
        if unmappable {
            if self.template.state.unmappable == Unmappable::Skip {
                // Not sent: whatever waits for it must not wait for ever.
                if let Some(d) = &done {
                    d.set();
                }
                if let Some(t) = &issues_token {
                    t.done.set();
                }
                return None;
            }
            flags |= replayed_flags::UNMAPPED;
        }
        // Values of the profile's JSON fields that earlier answers gave.
        let live_values = self.live_values(&request, e.timing.start);
        for (_, issued) in &live_values {
            after.push(issued.done.clone());
            flags |= replayed_flags::REWRITTEN;
        }
        // ETags: conditional requests carry the live one of the answer that gave the recorded.
        let mut live_headers = Vec::new();
        for name in [http::header::IF_NONE_MATCH, http::header::IF_MATCH] {
            if let Some(issued) = e
                .request
                .headers
                .get_str(name.as_str())
                .and_then(|v| self.etags.get(v))
            {
                after.push(issued.done.clone());
                live_headers.push((name, issued));
                flags |= replayed_flags::REWRITTEN;
            }
        }
        let issues_etag = match &e.response {
            Ok(r) => r.headers.get_str("etag").map(|etag| {
                let done = done
                    .get_or_insert_with(|| Arc::new(Done::default()))
                    .clone();
                let issued = Arc::new(Issued::new(done));
                self.etags.insert(etag.trim().to_string(), issued.clone());
                issued
            }),
            Err(_) => None,
        };
        let issues_json = self.issues_json(e, &mut done);
        let issues = match &e.response {
            Ok(r) if (200..300).contains(&r.status) => r
                .headers
                .get_str("location")
                .and_then(location_path)
                // Stored as the later requests that use it will look once rewritten.
                .map(|l| self.template.rewrites.target(&l).unwrap_or(l))
                .filter(|l| is_upload(l))
                .map(|location| {
                    let done = done
                        .get_or_insert_with(|| Arc::new(Done::default()))
                        .clone();
                    let issued = Arc::new(Issued::new(done));
                    if flags & replayed_flags::UNMAPPED != 0 {
                        issued.doom();
                    }
                    self.locations.insert(location, issued.clone());
                    issued
                }),
            _ => None,
        };
        Some(Planned {
            conn: self.key(source, e.connection),
            at,
            exchange: e.id,
            version: e.request.version,
            method: e.request.method.clone(),
            endpoint: self
                .template
                .classes
                .classify(e.request.method.as_str(), &e.request.target),
            request,
            recorded: RecordedOutcome {
                status: e.response.as_ref().ok().map(|r| r.status),
                first_byte: e.timing.response_head,
                total: e.timing.response_done,
            },
            flags,
            after,
            done,
            live_target,
            issues,
            auth_token,
            issues_token,
            live_headers,
            issues_etag,
            auth_use,
            recorded_credential,
            fallback,
            live_values,
            issues_json,
        })
    }

    /// The recorded values of the profile's JSON fields that `request` carries (target,
    /// header values, text body), with the exchanges whose live answers give theirs.
    fn live_values(&self, request: &Prepared, start: Nanos) -> Vec<(String, Arc<Issued>)> {
        let mut out: Vec<(String, Arc<Issued>)> = Vec::new();
        if self.values.is_empty() {
            return out;
        }
        let mut look = |text: &str| {
            for_each_token(text, |t| {
                // Only a value an answer gave before this request started on the tape.
                if let Some(issued) = self.values.get(t).filter(|i| i.recorded_end <= start) {
                    if !out.iter().any(|(v, _)| v == t) {
                        out.push((t.to_string(), issued));
                    }
                }
            })
        };
        look(request.path.as_str());
        for v in request.headers.values() {
            if let Ok(text) = v.to_str() {
                look(text);
            }
        }
        if let BodySource::Bytes(b) = &request.body {
            if let Ok(text) = std::str::from_utf8(b) {
                look(text);
            }
        }
        out
    }

    /// The values of the profile's JSON fields in the recorded answer: later requests that
    /// carry one take the live answer's instead.
    fn issues_json(
        &mut self,
        e: &Exchange,
        done: &mut Option<Arc<Done>>,
    ) -> Vec<(String, Arc<Issued>)> {
        let fields = &self.template.state.json_fields;
        let Ok(response) = &e.response else {
            return Vec::new();
        };
        let body = match response.body.whole_inline() {
            Some(b) if !fields.is_empty() && (200..300).contains(&response.status) => b,
            _ => return Vec::new(),
        };
        let found = json_values(body, fields);
        let mut out = Vec::with_capacity(found.len());
        for (value, pointer) in found {
            let done = done
                .get_or_insert_with(|| Arc::new(Done::default()))
                .clone();
            let issued = Arc::new(Issued::ending(done, e.timing.end()));
            self.values.insert(value, issued.clone());
            out.push((pointer, issued));
        }
        out
    }

    /// Where the request's credential comes from (see `auth.rs`): a rule's, a token request
    /// sent with a rule's account, the live token of a token request on the tape, or one
    /// fetched after the target's 401. Sets the header where it is known now.
    #[allow(clippy::type_complexity)]
    fn credentials(
        &mut self,
        e: &Exchange,
        request: &mut Prepared,
        after: &mut Vec<Arc<Done>>,
        done: &mut Option<Arc<Done>>,
    ) -> (
        AuthUse,
        Option<Arc<Issued>>,
        Option<Arc<Issued>>,
        Option<Arc<Fallback>>,
    ) {
        let path = e.request.path();
        if crate::redact::is_token_endpoint(path) {
            // The tokens it issues replace the recorded ones in later requests, whether the
            // request was anonymous (a public pull) or sent with an account.
            let mut issues_token = None;
            if !e.issued_secrets.is_empty() {
                let done = done
                    .get_or_insert_with(|| Arc::new(Done::default()))
                    .clone();
                let issued = Arc::new(Issued::new(done));
                for secret in &e.issued_secrets {
                    self.tokens.insert(secret.fingerprint, issued.clone());
                }
                issues_token = Some(issued);
            }
            let Some(redacted) = request.authorization.as_ref() else {
                return (AuthUse::None, None, issues_token, None);
            };
            let account = query_value(&e.request.target, "account");
            let rule =
                self.template
                    .auth
                    .rule_for(path, Some(redacted.fingerprint), account.as_deref());
            return match rule {
                Some((i, rule)) => match &rule.credential {
                    Credential::RegistryToken(account) => {
                        request
                            .headers
                            .insert(http::header::AUTHORIZATION, account.clone());
                        (AuthUse::TokenRequest(i), None, issues_token, None)
                    }
                    _ => (AuthUse::Dropped, None, issues_token, None),
                },
                None => (AuthUse::Dropped, None, issues_token, None),
            };
        }
        let Some(redacted) = request.authorization.as_ref() else {
            return (AuthUse::None, None, None, None);
        };
        let recorded = redacted.fingerprint;
        let bearer = matches!(redacted.kind, SecretKind::Bearer | SecretKind::BearerJwt);
        let auth = &self.template.auth;
        let fallback = if bearer {
            auth.token_account(path).map(|(i, account)| {
                if self.fallbacks.len() >= 16_384 {
                    self.fallbacks.clear();
                }
                let f = self
                    .fallbacks
                    .entry(recorded)
                    .or_insert_with(|| Arc::new(Fallback::new(account)))
                    .clone();
                (i, f)
            })
        } else {
            None
        };
        if let Some(issued) = self.tokens.get(recorded) {
            after.push(issued.done.clone());
            return (
                AuthUse::LiveToken,
                Some(issued),
                None,
                fallback.map(|(_, f)| f),
            );
        }
        match auth.rule_for(path, Some(recorded), None) {
            Some((i, rule)) => match &rule.credential {
                Credential::Basic(v) | Credential::Bearer(v) => {
                    request
                        .headers
                        .insert(http::header::AUTHORIZATION, v.clone());
                    (AuthUse::Rule(i), None, None, None)
                }
                Credential::Jwt { key, issuer } => {
                    request
                        .headers
                        .insert(http::header::AUTHORIZATION, sign_jwt(key, issuer));
                    (AuthUse::Rule(i), None, None, None)
                }
                Credential::RegistryToken(_) => match fallback {
                    Some((i, f)) => (AuthUse::Fetched(i), None, None, Some(f)),
                    None => (AuthUse::Dropped, None, None, None),
                },
            },
            None => (AuthUse::Dropped, None, None, None),
        }
    }

    /// A request waits for the latest write to the same path that ended on the tape before it
    /// started and is still in flight (a push's manifest, then its pull). Requests that
    /// overlapped it on the tape do not: the recorded client did not wait either.
    fn causality(&mut self, e: &Exchange) -> (Option<Arc<Done>>, Option<Arc<Done>>) {
        let path = e.request.path();
        let after = self
            .writes
            .get(path)
            .filter(|(d, end)| *end <= e.timing.start && !d.is_set())
            .map(|(d, _)| d.clone());
        if matches!(
            e.request.method,
            Method::Get | Method::Head | Method::Options | Method::Trace
        ) {
            return (after, None);
        }
        let done = Arc::new(Done::default());
        self.writes
            .insert(path.to_string(), (done.clone(), e.timing.end()));
        self.inserted_since_sweep += 1;
        if self.inserted_since_sweep >= 1024 {
            // Forget completed writes: the map holds only what is in flight.
            self.writes.retain(|_, (d, _)| !d.is_set());
            self.inserted_since_sweep = 0;
        }
        (after, Some(done))
    }
}
