//! The sessions themselves: pulls, pushes, Quay API calls and Clair reports, as the clients
//! that make them (skopeo, the Quay UI, Quay calling Clair) send them.

use super::*;

/// A running session: its random stream, where its events go, and whether it has sent yet
/// (think time comes before every request but the first).
pub(super) struct Session {
    shared: Arc<Shared>,
    rng: Rng,
    events: mpsc::Sender<Event>,
    started: bool,
}

impl Session {
    pub(super) fn new(shared: Arc<Shared>, events: mpsc::Sender<Event>, rng: Rng) -> Session {
        Session {
            shared,
            rng,
            events,
            started: false,
        }
    }

    pub(super) async fn run(mut self, kind: Kind, index: usize) {
        let _ = match kind {
            Kind::Pull => self.pull().await,
            Kind::Api => self.api().await,
            Kind::Clair => self.clair().await,
            Kind::Push => {
                let model = &self.shared.options.model;
                let app = self.rng.zipf(model.images);
                let repository = format!("{}/app{app}", model.namespace);
                self.push(repository, format!("v1.{index}")).await
            }
        };
    }

    /// Sends `call` from `client` after a think time, records the outcome, and returns the
    /// answer if its status is one of `expect`.
    async fn send(
        &mut self,
        client: &mut Client,
        call: Call,
        expect: &[u16],
    ) -> Result<Answer, Ended> {
        if self.started {
            let think = self.rng.exponential(self.shared.options.model.think_ms);
            tokio::time::sleep(Duration::from_secs_f64(think / 1000.0)).await;
        }
        self.started = true;
        let request = format!(
            "{} {}",
            call.method,
            call.target.split('?').next().unwrap_or("")
        );
        let mut builder = http::Request::builder()
            .method(call.method)
            .uri(call.target);
        builder = builder.header(header::HOST, self.shared.host.clone());
        builder = builder.header(header::USER_AGENT, client.agent);
        builder = match &client.credential {
            Credential::None => builder,
            Credential::Fixed(value) => builder.header(header::AUTHORIZATION, value.clone()),
            Credential::Jwt => builder.header(header::AUTHORIZATION, self.shared.jwt()),
        };
        for (name, value) in call.headers {
            builder = builder.header(name, value);
        }
        let Ok(built) = builder.body(Full::new(call.body)) else {
            return Err(self
                .unexpected(format!("cannot make a request of {request}"))
                .await);
        };
        let answer = match client.send(self.shared.options.target, built).await {
            Ok(answer) => Answer { request, ..answer },
            Err(why) => {
                tracing::debug!("traffic driver: {request} failed: {why}");
                self.event(Event::Failed).await;
                return Err(Ended);
            }
        };
        self.event(Event::Answered(answer.status)).await;
        match answer.status {
            status if expect.contains(&status) => Ok(answer),
            // Quay's nginx under CPU pressure: a fault the target was told to show.
            502 => Err(Ended),
            status => Err(self
                .unexpected(format!("{status} {}", answer.request))
                .await),
        }
    }

    async fn event(&self, event: Event) {
        // The driver gone means the drive was dropped: nobody is counting.
        let _ = self.events.send(event).await;
    }

    async fn unexpected(&self, what: String) -> Ended {
        self.event(Event::Unexpected(what)).await;
        Ended
    }

    /// An answer with the right status but not the right content.
    async fn malformed(&self, answer: &Answer, why: &str) -> Ended {
        let what = format!("{} {}: {why}", answer.status, answer.request);
        self.unexpected(what).await
    }

    /// An image by popularity, or none before any push finished.
    fn popular_image(&mut self) -> Option<Arc<Image>> {
        let catalog = self.shared.catalog();
        let n = catalog.images.len();
        (n > 0).then(|| catalog.images[self.rng.zipf(n)].clone())
    }

    /// The registry's token flow on `registry`: `GET /v2/` for the challenge, then its realm
    /// with Basic credentials and the scope; the token becomes the client's credential.
    async fn log_in(
        &mut self,
        registry: &mut Client,
        repository: &str,
        actions: &str,
    ) -> Result<(), Ended> {
        let challenge = self.send(registry, Call::get("/v2/"), &[401]).await?;
        let header = challenge.header("www-authenticate").unwrap_or_default();
        let bearer = header.strip_prefix("Bearer ").unwrap_or_default();
        let params = challenge_params(bearer);
        let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let (Some(realm), Some(service)) = (param("realm"), param("service")) else {
            let why = "no Bearer challenge with a realm and a service";
            return Err(self.malformed(&challenge, why).await);
        };
        let realm = origin_form(realm);
        let separator = if realm.contains('?') { '&' } else { '?' };
        let user = encode(&self.shared.options.credentials.user);
        let scope = encode(&format!("repository:{repository}:{actions}"));
        let service = encode(service);
        let target = format!("{realm}{separator}account={user}&scope={scope}&service={service}");
        let call = Call::get(target).with(header::AUTHORIZATION, self.shared.basic.clone());
        let answer = self.send(registry, call, &[200]).await?;
        let body = answer.json();
        let token = body["token"].as_str().or(body["access_token"].as_str());
        let Some(token) = token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
        else {
            return Err(self.malformed(&answer, "no token in the answer").await);
        };
        registry.credential = Credential::Fixed(token);
        Ok(())
    }

    /// A pull as skopeo makes it: token, manifest (sometimes HEAD first), config, layers, each
    /// blob checked against its digest.
    async fn pull(&mut self) -> Result<(), Ended> {
        let Some(image) = self.popular_image() else {
            return Ok(());
        };
        let mut registry = Client::new(REGISTRY_AGENT, Credential::None);
        self.log_in(&mut registry, &image.repository, "pull")
            .await?;
        let manifest = format!("/v2/{}/manifests/{}", image.repository, image.tag);
        let accept =
            |call: Call| call.with(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        if self.rng.chance(HEAD_MANIFEST_FIRST) {
            let head = accept(Call::new(Method::HEAD, &manifest));
            self.send(&mut registry, head, &[200]).await?;
        }
        let answer = self
            .send(&mut registry, accept(Call::get(manifest)), &[200])
            .await?;
        let parsed = answer.json();
        let layers = parsed["layers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let blobs = std::iter::once(&parsed["config"]).chain(layers);
        let Some(digests) = blobs
            .map(|b| b["digest"].as_str())
            .collect::<Option<Vec<_>>>()
        else {
            return Err(self.malformed(&answer, "not an image manifest").await);
        };
        for digest in digests {
            let blob = Call::get(format!("/v2/{}/blobs/{digest}", image.repository));
            let answer = self.send(&mut registry, blob, &[200]).await?;
            if crate::testbed::sha256(&answer.body) != digest {
                return Err(self
                    .malformed(&answer, "the bytes do not match the digest")
                    .await);
            }
        }
        Ok(())
    }

    /// A push as skopeo makes it (layers, some reused from other images, then the config and
    /// the manifest), then Quay's calls to Clair for the new manifest.
    pub(super) async fn push(&mut self, repository: String, tag: String) -> Result<(), Ended> {
        let reusable: Vec<Blob> = {
            let catalog = self.shared.catalog();
            catalog
                .images
                .iter()
                .flat_map(|i| i.layers.iter().cloned())
                .collect()
        };
        let model = self.shared.options.model.clone();
        let mut blobs = Vec::with_capacity(model.layers + 1);
        for _ in 0..model.layers {
            if !reusable.is_empty() && self.rng.chance(REUSED_LAYER) {
                blobs.push((reusable[self.rng.below(reusable.len())].clone(), None));
            } else {
                let bytes = layer_bytes(&mut self.rng, model.layer_kib);
                blobs.push((Blob::of(&bytes), Some(bytes)));
            }
        }
        let layers: Vec<Blob> = blobs.iter().map(|(blob, _)| blob.clone()).collect();
        let config = image_config(&mut self.rng, &repository, &layers);
        let manifest = image_manifest(&Blob::of(&config), &layers);
        blobs.push((Blob::of(&config), Some(config)));

        let mut registry = Client::new(REGISTRY_AGENT, Credential::None);
        self.log_in(&mut registry, &repository, "pull,push").await?;
        for (blob, bytes) in &blobs {
            self.upload(&mut registry, &repository, blob, bytes.as_ref())
                .await?;
        }
        let put = Call::new(Method::PUT, format!("/v2/{repository}/manifests/{tag}"));
        let put = put.body(OCI_MANIFEST, manifest.clone());
        self.send(&mut registry, put, &[201]).await?;
        drop(registry);

        let manifest = crate::testbed::sha256(&manifest);
        let image = Arc::new(Image {
            repository,
            tag,
            manifest,
            layers,
        });
        self.shared.catalog().images.push(image.clone());
        self.index(&image).await
    }

    /// One blob: `HEAD` (200: already there, done), then an upload session followed exactly
    /// by its Locations. `bytes` is `None` for a layer reused from another image, which must
    /// be there.
    async fn upload(
        &mut self,
        registry: &mut Client,
        repository: &str,
        blob: &Blob,
        bytes: Option<&Bytes>,
    ) -> Result<(), Ended> {
        let head = Call::new(
            Method::HEAD,
            format!("/v2/{repository}/blobs/{}", blob.digest),
        );
        let expect: &[u16] = if bytes.is_some() { &[404, 200] } else { &[200] };
        let there = self.send(registry, head, expect).await?;
        let Some(bytes) = bytes.filter(|_| there.status == 404) else {
            return Ok(());
        };
        let post = Call::new(Method::POST, format!("/v2/{repository}/blobs/uploads/"));
        let started = self.send(registry, post, &[202]).await?;
        let location = self.location(&started).await?;
        let patch = Call::new(Method::PATCH, location);
        let patched = self
            .send(
                registry,
                patch.body("application/octet-stream", bytes.clone()),
                &[202],
            )
            .await?;
        let location = self.location(&patched).await?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let digest = encode(&blob.digest);
        let put = Call::new(Method::PUT, format!("{location}{separator}digest={digest}"));
        self.send(registry, put, &[201]).await?;
        Ok(())
    }

    async fn location(&self, answer: &Answer) -> Result<String, Ended> {
        match answer.header("location") {
            Some(location) => Ok(origin_form(location)),
            None => Err(self.malformed(answer, "no Location").await),
        }
    }

    /// Quay indexing a new manifest with Clair, as its own client, then fetching the
    /// vulnerability report.
    async fn index(&mut self, image: &Image) -> Result<(), Ended> {
        let mut clair = Client::new(CLAIR_AGENT, Credential::Jwt);
        let post = self.index_request(image);
        let indexed = self.send(&mut clair, post, &[201]).await?;
        {
            let mut catalog = self.shared.catalog();
            catalog.indexed.push(image.manifest.clone());
            if let Some(state) = indexed.headers.get(header::ETAG) {
                catalog.index_state = Some(state.clone());
            }
        }
        let report = format!("/matcher/api/v1/vulnerability_report/{}", image.manifest);
        self.send(&mut clair, Call::get(report), &[200]).await?;
        Ok(())
    }

    /// `POST /indexer/api/v1/index_report` for `image`, its layers at their storage URLs.
    fn index_request(&self, image: &Image) -> Call {
        let storage = &self.shared.options.storage;
        let layer = |b: &Blob| {
            let uri = format!("{storage}{}", b.digest);
            json!({"hash": b.digest, "uri": uri, "headers": {}})
        };
        let layers: Vec<Value> = image.layers.iter().map(layer).collect();
        let body = json!({"hash": image.manifest, "layers": layers}).to_string();
        Call::new(Method::POST, "/indexer/api/v1/index_report").body("application/json", body)
    }

    /// Quay's UI or automation: who am I, the namespace's repositories, one's tags, and now and
    /// then a permission change.
    async fn api(&mut self) -> Result<(), Ended> {
        let mut quay = Client::new(API_AGENT, Credential::Fixed(self.shared.api.clone()));
        let namespace = encode(&self.shared.options.model.namespace);
        self.send(&mut quay, Call::get("/api/v1/user/"), &[200])
            .await?;
        let repositories = Call::get(format!("/api/v1/repository?namespace={namespace}"));
        self.send(&mut quay, repositories, &[200]).await?;
        let Some(image) = self.popular_image() else {
            return Ok(());
        };
        let repository = &image.repository;
        let tags = format!("/api/v1/repository/{repository}/tag/?limit=100&onlyActiveTags=true");
        self.send(&mut quay, Call::get(tags), &[200]).await?;
        if self.rng.chance(PERMISSION_CHANGE) {
            let user = format!("/api/v1/repository/{repository}/permissions/user/bob");
            let put = Call::new(Method::PUT, user).body("application/json", r#"{"role":"read"}"#);
            self.send(&mut quay, put, &[200]).await?;
        }
        Ok(())
    }

    /// Quay asking Clair about a manifest a user looks at: the index state (revalidated with
    /// the ETag it saw last, when it has one), the index report, the vulnerability report.
    async fn clair(&mut self) -> Result<(), Ended> {
        let mut clair = Client::new(CLAIR_AGENT, Credential::Jwt);
        if self.rng.chance(REINDEXED) {
            if let Some(image) = self.popular_image() {
                let post = self.index_request(&image);
                self.send(&mut clair, post, &[201]).await?;
            }
        }
        let seen = self.shared.catalog().index_state.clone();
        let state = Call::get("/indexer/api/v1/index_state");
        let revalidated = seen.filter(|_| self.rng.chance(STATE_REVALIDATED));
        let answer = match revalidated {
            Some(seen) => self.send(
                &mut clair,
                state.with(header::IF_NONE_MATCH, seen),
                &[200, 304],
            ),
            None => self.send(&mut clair, state, &[200]),
        };
        let current = answer.await?.headers.get(header::ETAG).cloned();
        if let Some(current) = &current {
            self.shared.catalog().index_state = Some(current.clone());
        }
        let manifest = {
            let catalog = self.shared.catalog();
            let n = catalog.indexed.len();
            (n > 0).then(|| catalog.indexed[self.rng.zipf(n)].clone())
        };
        let Some(manifest) = manifest else {
            return Ok(());
        };
        let report = Call::get(format!("/indexer/api/v1/index_report/{manifest}"));
        let answer = match current.filter(|_| self.rng.chance(REPORT_REVALIDATED)) {
            Some(current) => self.send(
                &mut clair,
                report.with(header::IF_NONE_MATCH, current),
                &[200, 304],
            ),
            None => self.send(&mut clair, report, &[200]),
        };
        answer.await?;
        let vulnerabilities = format!("/matcher/api/v1/vulnerability_report/{manifest}");
        self.send(&mut clair, Call::get(vulnerabilities), &[200])
            .await?;
        Ok(())
    }
}
